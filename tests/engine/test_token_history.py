"""The incremental int64 copy of a sequence's token list equals the list after every kind of change
the engine makes (appends, a placeholder swapped for the drawn token, a placeholder dropped)."""

from __future__ import annotations

import random

import numpy as np
import torch

from tokenmill.engine.token_history import TokenHistory, padded_rows


def test_history_follows_appends_and_tail_rewrites():
    rng = random.Random(0)
    ids = [rng.randrange(1000) for _ in range(30)]
    history = TokenHistory()
    for step in range(400):
        action = rng.random()
        if action < 0.6:
            ids.append(rng.randrange(1000))
        elif action < 0.8:  # an overlapped step: placeholder in, then swapped for the drawn token
            ids.append(-1)
            assert history.array(ids).tolist() == ids
            ids.pop()
            ids.append(rng.randrange(1000))
        elif ids:  # a placeholder dropped (abort / preemption of an in-flight draw)
            ids.append(-1)
            assert history.array(ids).tolist() == ids
            ids.pop()
        got = history.array(ids)
        assert got.dtype == np.int64 and got.tolist() == ids, step


def test_padded_rows():
    a, b = TokenHistory(), TokenHistory()
    out = padded_rows([a.array([5, 6, 7]), (), b.array([9])])
    assert out.dtype == torch.int64
    assert out.tolist() == [[5, 6, 7], [-1, -1, -1], [9, -1, -1]]
    assert padded_rows([(), ()]).shape == (2, 1)
