"""The engine core: one LLMEngine and its step loop, behind a ZMQ ROUTER socket.

The core takes already-tokenized requests and aborts from any number of API-side clients and
answers each client once per step with the new token ids of its requests (see
engine_core_messages). It never detokenizes, renders templates or touches HTTP, so the step
loop has the process (and its GIL) to itself when it runs in its own process.

A client that disconnects (its process died) has its requests aborted: the core sends every
client a message after each step, and a send to a client that is gone fails (ROUTER_MANDATORY). When the loop itself
fails, or the engine turns unhealthy (a tensor-parallel worker died), every client is told (["dead", reason]) and the core stays dead: whoever supervises it
(Ray Serve's health check) replaces it.
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from tokenmill.engine.errors import QueueFullError
from tokenmill.engine.outputs import TokenDeltas
from tokenmill.serve.engine_core_messages import decode_params, pack, pack_prompt_logprobs, take_new_tokens, unpack

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # how often an idle loop looks at its stop flag
# A loop that has not come round for this long outside an engine step is stuck (a step may take
# long; the rest of an iteration takes milliseconds): the core reports itself unhealthy.
STALLED_LOOP_S = 20.0


def _parse(frames: list[bytes]) -> tuple[bytes, list[Any]] | None:
    """(client identity, message) of a ROUTER frame pair, or None when it is not one."""
    if len(frames) != 2:
        return None
    try:
        message = unpack(frames[1])
    except Exception:  # noqa: BLE001 - garbage from whoever reached the socket
        return None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        return None
    return frames[0], message


class EngineUnhealthyError(RuntimeError):
    """The engine reports it cannot run any more: the core ends, and its supervisor replaces it."""


@dataclass
class _Reply:
    """What one client gets after one loop iteration."""

    outputs: list[list[Any]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: list[list[Any]] = field(default_factory=list)
    deltas: list[list[Any]] = field(default_factory=lambda: [[], [], []])  # request ids, new ids, cumulative logprobs


class EngineCore:
    """Runs `engine` in a loop thread; clients connect to `address` (a ZMQ DEALER each)."""

    def __init__(self, engine: Any, bind: str = "tcp://127.0.0.1:*", context: zmq.Context | None = None,
                 core_id: str = "core", token: str | None = None) -> None:
        self.engine = engine
        # Token-only outputs in columns (one object a step, not one a request) while this core runs
        # the engine; the engine's own setting comes back when the loop ends.
        self._engine_compact_deltas = getattr(engine, "compact_deltas", None)
        if self._engine_compact_deltas is not None:
            engine.compact_deltas = True
        self.core_id = core_id
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a client that is gone fails: drop it
        self.socket.setsockopt(zmq.SNDHWM, 0)  # never drop outputs for a slow client
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.bind(bind)
        self.address: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dead_reason: str | None = None
        self._token = token  # a client's hello must carry it (None: any hello is welcome)
        self._clients: set[bytes] = set()
        self._owner: dict[str, bytes] = {}  # request id -> client identity
        self._num_sent: dict[str, dict[int, int]] = {}  # request id -> sequence index -> tokens sent
        self._scores_sent: set[str] = set()  # requests whose prompt log-probs went out (sent once)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tokenmill-engine-core-{core_id}", daemon=True)
        self._last_round = time.monotonic()  # when the loop last came round (or started a step)
        self._stepping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "EngineCore":
        self._thread.start()
        return self

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and self._thread.is_alive()

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    @property
    def stalled_for(self) -> float:
        """Seconds the loop has not come round, outside an engine step (0 while a step runs)."""
        if self._stepping or not self._thread.is_alive():
            return 0.0
        return time.monotonic() - self._last_round

    def loop_stack(self) -> str:
        """Where the loop thread is now (for the log of a stalled core)."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(the loop thread is not running)"

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def info(self) -> dict[str, Any]:
        """What a client needs to serve this engine (sent pickled in the welcome)."""
        engine = self.engine
        return {
            "core_id": self.core_id,
            "model_name": engine.model_name,
            "tokenizer": engine.tokenizer,
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
            "kv_cache_capacity_tokens": engine.kv_cache_capacity_tokens,
            "max_num_seqs": engine.scheduler_config.max_num_seqs,
            "block_size": engine.block_manager.block_size,
            "default_sampling_params": engine.default_sampling_params(),
            "stats": asdict(engine.get_stats()),
        }

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._last_round = time.monotonic()
                replies: dict[bytes, _Reply] = defaultdict(_Reply)
                busy = self.engine.has_unfinished_requests()
                changed = self._receive(0 if busy else IDLE_POLL_MS, replies)
                if self.engine.has_unfinished_requests():
                    self._stepping = True
                    try:
                        outputs = self.engine.step()
                    finally:
                        self._stepping = False
                        self._last_round = time.monotonic()
                    self._route(outputs, replies)
                    changed = True
                while changed:  # a client found gone had its requests aborted: tell the others
                    changed = self._send(replies)
                    replies = defaultdict(_Reply)
                if not getattr(self.engine, "is_healthy", True):  # its failed requests went out above
                    raise EngineUnhealthyError("the engine can no longer run its model (a tensor-parallel worker died)")
            reason = "the engine core was shut down"
        except BaseException as exc:  # noqa: BLE001 - any fault ends the loop; clients must be told
            logger.exception("engine core loop died")
            reason = f"the engine loop died: {exc!r}"
        if self._engine_compact_deltas is not None:
            self.engine.compact_deltas = self._engine_compact_deltas
        self.dead_reason = reason
        for client in list(self._clients):
            self._send_to(client, ["dead", reason])
        self._refuse_newcomers(reason)
        self.socket.close()

    def _refuse_newcomers(self, reason: str) -> None:
        """A client whose hello is still queued gets the reason instead of waiting for a welcome."""
        while self.socket.poll(0):
            parsed = _parse(self.socket.recv_multipart())
            if parsed is not None and parsed[1][0] == "hello" and parsed[0] not in self._clients:
                self._send_to(parsed[0], ["dead", reason])

    def _receive(self, timeout_ms: int, replies: dict[bytes, _Reply]) -> bool:
        """Apply every queued message; True if any arrived. A malformed message is dropped: whoever
        can reach the socket must not be able to stop the loop."""
        if not self.socket.poll(timeout_ms):
            return False
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            parsed = _parse(frames)
            if parsed is None:
                logger.warning("engine core: dropped a message that is not [identity, msgpack list]")
                continue
            client, message = parsed
            try:
                self._dispatch(client, message, replies)
            except Exception:  # noqa: BLE001 - the message's fault (wrong fields), not the engine's
                logger.warning("engine core: dropped a malformed %r message", message[0], exc_info=True)

    def _dispatch(self, client: bytes, message: list[Any], replies: dict[bytes, _Reply]) -> None:
        kind = message[0]
        if kind == "hello":
            self._hello(client, message)
        elif client not in self._clients:  # never welcomed, or dropped: it must connect again
            if kind == "add":
                self._send_to(client, ["dead", "this client is not connected to the engine core (no accepted "
                                               "hello); connect again"])
        elif kind == "add":
            self._add(client, message, replies[client])
        elif kind == "abort":
            self._abort(list(message[1]))

    def _hello(self, client: bytes, message: list[Any]) -> None:
        token = message[1] if len(message) > 1 else None
        if self._token is not None and not (
            isinstance(token, str) and hmac.compare_digest(token.encode(), self._token.encode())
        ):
            logger.warning("engine core: refused a client with a wrong or missing token")
            self._send_to(client, ["refused", "wrong or missing core token"])
            return
        self._clients.add(client)
        self._send_to(client, ["welcome", pickle.dumps(self.info())])

    def _add(self, client: bytes, message: list[Any], reply: _Reply) -> None:
        _, request_id, prompt_token_ids, fields = message
        try:
            self.engine.add_request(request_id, prompt_token_ids, decode_params(fields))
        except QueueFullError as exc:
            reply.rejected.append([request_id, "queue_full", str(exc)])
            return
        except ValueError as exc:
            reply.rejected.append([request_id, "value", str(exc)])
            return
        except Exception as exc:  # noqa: BLE001 - the request's own failure, handed to its client
            reply.rejected.append([request_id, "internal", f"{type(exc).__name__}: {exc}"])
            return
        self._owner[request_id] = client
        self._num_sent[request_id] = {}
        reply.accepted.append(request_id)

    def _abort(self, request_ids: list[str]) -> None:
        mine = [rid for rid in request_ids if self._owner.pop(rid, None) is not None]
        for rid in mine:
            del self._num_sent[rid]
            self._scores_sent.discard(rid)
        if mine:
            self.engine.abort_request(mine)

    def _drop_client(self, client: bytes) -> None:
        self._clients.discard(client)
        self._abort([rid for rid, owner in self._owner.items() if owner == client])

    def _route(self, outputs: list[Any], replies: dict[bytes, _Reply]) -> None:
        for output in outputs:
            if type(output) is TokenDeltas:
                self._route_deltas(output, replies)
                continue
            rid = output.request_id
            client = self._owner.get(rid)
            if client is None:
                continue  # aborted meanwhile
            sequences = take_new_tokens(output, self._num_sent[rid])
            prompt_logprobs = None
            if output.prompt_logprobs is not None and rid not in self._scores_sent:
                prompt_logprobs = pack_prompt_logprobs(output.prompt_logprobs)  # once, when the prompt is scored
                self._scores_sent.add(rid)
            replies[client].outputs.append([rid, output.finished, output.error, output.num_cached_tokens, sequences,
                                            prompt_logprobs])
            if output.finished:
                del self._owner[rid], self._num_sent[rid]
                self._scores_sent.discard(rid)

    def _route_deltas(self, deltas: TokenDeltas, replies: dict[bytes, _Reply]) -> None:
        owner, num_sent = self._owner, self._num_sent
        for rid, new_ids, cumulative in zip(deltas.request_ids, deltas.token_ids, deltas.cumulative_logprobs):
            client = owner.get(rid)
            if client is None:
                continue  # aborted meanwhile
            sent = num_sent[rid]
            sent[0] = sent.get(0, 0) + len(new_ids)
            ids, tokens, logprobs = replies[client].deltas
            ids.append(rid)
            tokens.append(new_ids)
            logprobs.append(cumulative)

    def _send(self, replies: dict[bytes, _Reply]) -> bool:
        """Send every client its reply and the stats; True if a client was found gone (and dropped)."""
        stats = asdict(self.engine.get_stats())
        dropped = False
        for client in list(self._clients):
            reply = replies.get(client) or _Reply()
            if not self._send_to(client, ["step", reply.outputs, reply.accepted, reply.rejected, stats, reply.deltas]):
                self._drop_client(client)
                dropped = True
        return dropped

    def _send_to(self, client: bytes, message: list[Any]) -> bool:
        """False when the client is gone."""
        try:
            self.socket.send_multipart([client, pack(message)])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            logger.warning("engine core: a client disconnected; aborting its requests")
            return False
        return True


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.serve.engine_core [--bind ADDR] [engine flags]`: one engine core in this process.

    Prints its address once it listens, then runs until SIGTERM/SIGINT.
    """
    import argparse
    import signal

    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.serve.cli_args import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser(prog="python -m tokenmill.serve.engine_core")
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--bind", default="tcp://127.0.0.1:*", help="ZMQ address to listen on (default: a free port)")
    parser.add_argument("--token-env", default="TOKENMILL_CORE_TOKEN",
                        help="environment variable holding the secret a client's hello must carry "
                             "(default TOKENMILL_CORE_TOKEN; unset: any client is welcome)")
    add_engine_args(parser)
    args = parser.parse_args(argv)
    engine = LLMEngine.from_args(args.model, **engine_kwargs(args))
    engine.warm_up()
    core = EngineCore(engine, bind=args.bind, token=os.environ.get(args.token_env) or None).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(core.address, flush=True)
    while not stop.is_set() and core.is_alive:
        stop.wait(0.5)
    core.shutdown()


if __name__ == "__main__":
    main()
