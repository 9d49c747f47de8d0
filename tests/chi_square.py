"""Pearson's chi-square goodness-of-fit p-value in torch (no scipy: a bare GPU machine has none)."""

from __future__ import annotations

import torch


def chisquare_p_value(observed, expected) -> float:
    """P(chi2 with len - 1 degrees of freedom >= the statistic): the upper regularized incomplete
    gamma function Q(dof / 2, statistic / 2), as scipy.stats.chisquare's p-value."""
    observed = torch.as_tensor(observed, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))
