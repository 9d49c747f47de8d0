"""Counter-based randomness shared by the sampling kernel and its torch reference.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") with
counter (token_index, offset_lo, offset_hi, 0) and key (seed_lo, seed_hi). Only the
first output word is used: one 32-bit draw per (seed, offset, token_index), so a
row's draw depends on nothing else in its batch.

The Triton and torch versions compute the same bits; both turn the word into an
Exp(1) variate with the same float32 arithmetic, so reference and kernel pick the
same token (up to the last ulp of `log`).
"""

import torch
import triton
import triton.language as tl

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_NUM_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# Below this uniform, -log(1 - u) is taken from its series (log1p without log1p).
SERIES_CUTOFF = 0.0078125  # 2**-7


@triton.jit
def philox_word(index, offset_lo, offset_hi, seed_lo, seed_hi):
    """First output word of Philox4x32-10; all arguments uint32 (index a block)."""
    c0 = index
    c1 = offset_lo + index * 0
    c2 = offset_hi + index * 0
    c3 = index * 0
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(10):
        hi_a = tl.umulhi(c0, 0xD2511F53)
        hi_b = tl.umulhi(c2, 0xCD9E8D57)
        lo_a = c0 * 0xD2511F53
        lo_b = c2 * 0xCD9E8D57
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def exponential_from_word(word):
    """Exp(1) variate from a uint32 word, float32, fine-grained near 0."""
    u = word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (0, 1]
    series = u * (1.0 + u * (0.5 + u * (0.3333333432674408 + u * 0.25)))
    return tl.where(u < 0.0078125, series, -tl.log(1.0 - u))


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a in [0, 2**32) (int64) and a 32-bit constant b."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    prod_lo = a * b_lo  # < 2**48
    prod_hi = a * b_hi  # < 2**48
    hi = (prod_hi + (prod_lo >> 16)) >> 16
    lo = (((prod_hi & 0xFFFF) << 16) + prod_lo) & MASK32
    return hi, lo


def philox_word_torch(
    index: torch.Tensor, offset: torch.Tensor, seed: torch.Tensor
) -> torch.Tensor:
    """Torch twin of `philox_word`: int64 tensors (broadcastable), result in [0, 2**32) as int64."""
    index = index.to(torch.int64) & MASK32
    offset = offset.to(torch.int64)
    seed = seed.to(torch.int64)
    c0 = index
    c1 = (offset & MASK32).expand_as(index)
    c2 = ((offset >> 32) & MASK32).expand_as(index)
    c3 = torch.zeros_like(index)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(PHILOX_NUM_ROUNDS):
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0


def exponential_from_word_torch(word: torch.Tensor) -> torch.Tensor:
    """Torch twin of `exponential_from_word` (float32)."""
    u = word.to(torch.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    series = u * (1.0 + u * (0.5 + u * (0.3333333432674408 + u * 0.25)))
    return torch.where(u < SERIES_CUTOFF, series, -torch.log(1.0 - u))
