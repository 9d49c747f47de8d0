"""Counter-based randomness and the exact draw arithmetic shared by the sampling kernel and its reference.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") with counter
(0, offset_lo, offset_hi, 0) and key (seed_lo, seed_hi) gives ONE 32-bit word per row and step:
a request's draw depends on its (seed, offset) only, never on its batch neighbours.

The word picks a token by an inverse CDF over the kept set, in integers so that every
implementation (torch, the Triton kernel, any split of a row across programs) picks the same token:

    w_i    = int64(float32(exp(s_i - max s)) * 2**38)   for kept i, else 0     (exact: power-of-two scale)
    total  = sum_i w_i                                  (< 2**58 for vocabularies below 2**20)
    target = floor(total * word / 2**32)                (exact 96-bit product, see `draw_target*`)
    token  = the smallest i with w_0 + ... + w_i > target

Integer sums do not depend on summation order. Token i is drawn with probability w_i / total to
within 2**-32; tokens lighter than 2**-38 of the top token are never drawn (their mass is below
V * 2**-38, 5.5e-7 at 151,936 entries). The only float step is `exp`, which may differ by an ulp
between libraries: that moves a pick only when the target falls in the ulp, about once per 2**24 draws.
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
WEIGHT_SCALE = 274877906944.0  # 2**38: float32 exp(s - max) in (0, 1] -> integer weight
MAX_VOCAB = 1 << 20  # keeps the integer total below 2**58


@triton.jit
def philox_word(index, offset_lo, offset_hi, seed_lo, seed_hi):
    """First output word of Philox4x32-10; all arguments uint32 (index a scalar or a block)."""
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
def draw_weight(s, row_max, kept):
    """Integer weight of each entry (int64 block): see the module docstring."""
    w = (tl.exp(s - row_max) * 274877906944.0).to(tl.int64)
    return tl.where(kept, w, 0)


@triton.jit
def draw_target(total, word):
    """floor(total * word / 2**32) for int64 total < 2**58 and word in [0, 2**32) (int64), exactly."""
    t_hi = total >> 29
    t_lo = total & 0x1FFFFFFF
    a = t_hi * word  # < 2**61
    b = t_lo * word  # < 2**61
    return (a >> 3) + ((((a & 7) << 29) + b) >> 32)


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
    index, offset, seed = torch.broadcast_tensors(
        index.to(torch.int64), offset.to(torch.int64), seed.to(torch.int64)
    )
    c0 = index & MASK32
    c1 = offset & MASK32
    c2 = (offset >> 32) & MASK32
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


def draw_weight_torch(
    scores: torch.Tensor, row_max: torch.Tensor, exp_out: torch.Tensor, weights_out: torch.Tensor
) -> torch.Tensor:
    """Torch twin of `draw_weight` for filtered scores [B, V] float32 (removed entries -inf, whose
    exp is exactly 0) and row_max [B, 1]. Writes the weights into `weights_out` ([B, V] int64) by
    way of `exp_out` ([B, V] float32 scratch); returns the softmax normaliser sum(exp(s - max)) [B]."""
    e = torch.sub(scores, row_max, out=exp_out).exp_()
    norm = e.sum(dim=-1)
    weights_out.copy_(e.mul_(WEIGHT_SCALE))  # float -> int64 truncates, as the kernel's conversion
    return norm


def draw_target_torch(total: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """Torch twin of `draw_target` (int64 tensors)."""
    a = (total >> 29) * word
    b = (total & 0x1FFFFFFF) * word
    return (a >> 3) + ((((a & 7) << 29) + b) >> 32)
