"""Errors the engine raises to its callers."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound (`max_waiting_requests`); retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can be served until it is restarted."""
