"""Masked cross-attention for the mirrored SGTR decoder, as one fused Triton kernel.

What this computes (paper section 3.2 and supplementary section 7, Align-SGTR):

    S    = Q K^T / sqrt(D)                                   (B, H, Lq, Lk) attention logits
    S_ij = -inf   with probability p, independently per element (a fresh mask per call)
    S_ij = -inf   where key j is padding
    O    = softmax(S, over keys) V                           (B, H, Lq, D)

Dropped logits take no share of the softmax: the surviving probabilities renormalise. This is NOT
dropout after the softmax (that would zero probabilities and rescale by 1/(1-p)). A row whose keys
are all dropped or padded has no distribution at all; we define its output as zeros and its
gradients as zeros (never NaN).

Symbols: B batch, H heads, Lq queries (SGTR: predicate queries, 100..300), Lk keys (entity or image
tokens, 100..1500), D head dimension, BM x BN the tile of logits one kernel step works on.

Why a kernel. The naive version materialises a (B, H, Lq, Lk) Bernoulli mask per cross-attention
block, per layer, per step, and walks over the (B, H, Lq, Lk) logits several times (scores, mask,
softmax, backward). The fused kernel never writes anything of size Lq*Lk: it draws each mask bit
inside the kernel from a counter-based random generator, right where the logit is computed, and
the backward regenerates the same bits from the same seed.

The random generator (the part worth reading twice):
    * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
      generator of cuRAND, of PyTorch's CUDA dropout, of FlashAttention's dropout and of
      tl.randint4x. It maps (counter: 4 x uint32, key: 2 x uint32) to 4 x uint32 random words.
    * key = the 64-bit seed, counter = (8 a + r, i, h, b) for key j = 64 a + 8 s + r: one call
      gives 128 bits = 8 decisions of 16 bits, decision s for key 64 a + 8 s + r (keys 8 apart, to
      match how tensor cores spread a row of logits over a thread; see _keep_tile). The mask bit of
      logit (b, h, i, j) is therefore a pure function of (seed, b, h, i, j): independent of tile
      sizes, of the launch grid, of the device. The same seed gives the same mask on the CUDA
      kernel, under the Triton interpreter and in the plain-PyTorch path below (which re-implements
      Philox on int64 tensors).
    * Several decisions per call, as FlashAttention's dropout does (it draws 16 decisions of 8 bits).
      The logit is dropped iff its 16-bit number u < round(p * 65536), so the drop rate is p up to
      1/131072 (8-bit numbers would turn p = 0.1 into 26/256 = 0.1016); p = 1 drops everything,
      p = 0 nothing (and skips the generator).
    * Cost: 10 rounds x (2 wide multiplies + 2 three-input xors) per 8 logits, plus picking the
      16 bits: about 10 integer instructions per logit, against one exp2 and a few float
      instructions per logit for the softmax and 2*D multiply-adds on the tensor cores. Compiled
      for sm_90 (fp16, D = 64) the forward kernel grows from 1152 to 1504 SASS instructions with
      the generator (kernels/BENCH.md); kernels/bench.py times it (`ours` against `ours_p0`).

Dispatch (masked_attention below): CUDA tensors run the Triton kernels; CPU tensors run the same
Triton kernels under the Triton interpreter if TRITON_INTERPRET=1 was set when this module was
imported (Triton reads the variable when `@triton.jit` decorates a function), else the plain-PyTorch
path with the identical mask. Plain pointer arithmetic, no TMA descriptors, no autotuner, so that
it runs on Triton >= 3.6: tested under the interpreter with Triton 3.9 and 3.6 and compiled for
sm_90 with both; NOT yet run on a GPU (kernels/BENCH.md says what that leaves unmeasured).

Run `python kernels/masked_attention.py` for a correctness check against PyTorch's attention given
the materialised mask and a small timing on whatever device is at hand; `python -m kernels.bench`
for the benchmark.

References: FlashAttention-2 (Dao 2023) for the online softmax and the backward; the Triton
tutorials 06-fused-attention (forward/backward structure) and 04-low-memory-dropout (seeded masks).
"""
import math
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # no Triton wheel for this platform (macOS, Windows): the PyTorch path still runs
    triton = tl = InterpretedFunction = None

# ---------------------------------------------------------------------------------------------------
# Philox4x32-10 and the Bernoulli mask, in plain PyTorch

PHILOX_ROUNDS = 10
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers (Random123; Triton's random.py)
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
U32 = 0xFFFFFFFF


def _mulhilo32(a, m):
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64 tensors; m a Python int.

    a * m needs 64 unsigned bits, more than int64 holds, so we multiply by m's two 16-bit halves
    (each product < 2**48) and recombine. Exact, no overflow, vectorised."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo = a * m_lo                                     # < 2**48
    p_hi = a * m_hi                                     # < 2**48; a*m = p_hi * 2**16 + p_lo
    # in-place ops on the fresh temporaries (about 25% faster on CPU than the plain expressions
    # hi = (p_hi + (p_lo >> 16)) >> 16 and lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & U32)
    hi = (p_lo >> 16).add_(p_hi).bitwise_right_shift_(16)
    lo = p_hi.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(p_lo).bitwise_and_(U32)
    return hi, lo


def philox4x32_torch(c0, c1, c2, c3, k0, k1, rounds=PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable); key (k0, k1) Python ints.

    Returns the four uint32 output words as int64 tensors. Same rounds, same constants, same word
    order as Random123's philox4x32 and Triton's tl.philox / tl.randint4x."""
    for _ in range(rounds):
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, hi0 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), hi0.bitwise_xor_(c3).bitwise_xor_(k1)
        c0, c1, c2, c3 = hi1, lo1, hi0, lo0              # = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & U32, (k1 + PHILOX_W1) & U32
    return c0, c1, c2, c3


def _check_seed_p(seed, p):
    """Validate seed and p; return (seed_lo, seed_hi, threshold) where drop <=> u16 < threshold."""
    try:
        seed = int(seed) if isinstance(seed, torch.Tensor) else seed.__index__()
    except (AttributeError, TypeError, RuntimeError):
        raise TypeError(f"seed must be a Python int, got {type(seed).__name__}") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"the masking probability p must lie in [0, 1], got {p}")
    return seed & U32, seed >> 32, round(p * 65536)


def bernoulli_mask(seed, shape, p, device="cpu"):
    """The (B, H, Lq, Lk) bool mask, True = dropped, that masked_attention applies for `seed`.

    Materialised for tests and teaching; masked_attention itself never builds it. On CUDA (or under
    TRITON_INTERPRET=1) it is written by a Triton kernel that calls the very same tile function as
    the attention kernels; on CPU it is computed here in PyTorch. Both give the same bits."""
    seed_lo, seed_hi, threshold = _check_seed_p(seed, p)
    B, H, Lq, Lk = (int(s) for s in shape)
    device = torch.device(device)
    if _use_triton(device) and B * H * Lq * Lk > 0:
        return _bernoulli_mask_triton(seed_lo, seed_hi, threshold, (B, H, Lq, Lk), device)
    if threshold == 0:                                    # p = 0: nothing to draw
        return torch.zeros((B, H, Lq, Lk), dtype=torch.bool, device=device)
    # key j = 64 a + 8 s + r: the Philox call with counter (8 a + r, i, h, b) draws the decisions
    # s = 0..7, i.e. for the 8 keys j = 64 a + r, 64 a + r + 8, ..., 64 a + r + 56
    A = -(-Lk // 64)                                      # blocks of 64 keys, ceil(Lk / 64)
    ar = lambda n: torch.arange(n, dtype=torch.int64, device=device)
    c0 = (8 * ar(A)[:, None] + ar(8)[None, :]).view(1, 1, 1, A * 8)   # counter word 0: 8 a + r
    c1 = ar(Lq).view(1, 1, Lq, 1)                         # counter word 1: query i
    c2 = ar(H).view(1, H, 1, 1)                           # counter word 2: head h
    c3 = ar(B).view(B, 1, 1, 1)                           # counter word 3: batch element b
    c0, c1, c2, c3 = (c.expand(B, H, Lq, A * 8) for c in (c0, c1, c2, c3))
    words = philox4x32_torch(c0, c1, c2, c3, seed_lo, seed_hi)             # 4 x (B, H, Lq, 8A)
    # decision s takes bits 16*(s%2) .. 16*(s%2)+15 of word s//2 (16-bit numbers, drop if < threshold)
    drop = torch.stack([((w.view(B, H, Lq, A, 8) >> shift) & 0xFFFF) < threshold
                        for w in words for shift in (0, 16)], dim=-2)       # (B, H, Lq, A, 8 s, 8 r)
    return drop.reshape(B, H, Lq, A * 64)[..., :Lk]                        # (B, H, Lq, Lk)


# ---------------------------------------------------------------------------------------------------
# The naive version: materialise the mask, then ordinary attention (also the CPU path)

def masked_attention_reference(q, k, v, p, seed, key_padding_mask=None):
    """Plain PyTorch: the mask of bernoulli_mask(seed, ...), padding, softmax, zeros for empty rows.

    Memory: the (B, H, Lq, Lk) logits, mask, probabilities and their gradients, a few passes each."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    drop = bernoulli_mask(seed, (B, H, Lq, Lk), p, device=q.device)        # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        drop = drop | key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    # A row with no surviving key has no softmax (all -inf gives NaN, forward and backward). We leave
    # such rows unmasked, so their softmax is finite, then zero their probabilities: zeros out, zero
    # gradients, and one fused torch.softmax for all rows.
    empty = drop.all(dim=-1, keepdim=True)                                  # (B, H, Lq, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))         # (B, H, Lq, Lk)
    attn = torch.softmax(s.masked_fill(drop & ~empty, float("-inf")), dim=-1)
    attn = attn.masked_fill(empty, 0.0)                                     # (B, H, Lq, Lk)
    return torch.matmul(attn.to(v.dtype), v)                               # (B, H, Lq, D)


# ---------------------------------------------------------------------------------------------------
# The Triton kernels
#
# Tiles: a program owns BM queries (forward, dq) or BN keys (dk/dv) of one (b, h) and loops over the
# other axis. Per (b, h) the forward reads Q once, K and V once per query tile, and writes O and a
# log-sum-exp per query; the (Lq, Lk) logits and the mask live only in registers, one tile at a time.

if triton is not None:

    @triton.jit
    def _philox4x32_10(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 tiles, the same algorithm as philox4x32_torch above."""
        for _ in tl.static_range(10):
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo1 = c2 * 0xCD9E8D57                          # uint32 product wraps: the low word
            lo0 = c0 * 0xD2511F53
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def _keep_tile(seed_lo, seed_hi, threshold, b, h, offs_m, start_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(BM, BN) bool: True where logit (b, h, offs_m[row], start_n + col) survives the draw.

        Key j = 64 a + 8 s + r gets decision s of the Philox call with counter (8 a + r, i, h, b).
        Why keys 8 apart share a call: a tensor-core accumulator gives each thread the columns
        8 s + 2 t and 8 s + 2 t + 1 of its rows (s = 0..BN/8-1; mma on Ampere, wgmma on Hopper), so
        with this grouping a thread uses all 8 decisions of every call it makes and no call is made by
        two threads. (Grouping 8 consecutive keys instead made each thread compute 4x more Philox.)
        Nothing here depends on BM or BN; start_n is a multiple of BN, BN a power of two >= 16."""
        k0 = seed_lo.to(tl.uint32, bitcast=True)
        k1 = seed_hi.to(tl.uint32, bitcast=True)
        r = tl.arange(0, 8)
        if BLOCK_N >= 64:  # the tile holds BN / 64 whole blocks of 64 keys, all 8 slots of each
            comb = (start_n // 64 + tl.arange(0, BLOCK_N // 64))[:, None] * 8 + r[None, :]  # (BN/64, 8)
            slot = tl.arange(0, 8)                                                          # (8,)
        else:              # the tile holds BN / 8 of the 8 slots of one block of 64 keys
            comb = (start_n // 64 * 8 + r)[None, :]                                         # (1, 8)
            slot = (start_n // 8) % 8 + tl.arange(0, BLOCK_N // 8)                         # (BN/8,)
        shape: tl.constexpr = (BLOCK_M, comb.shape[0], 8)
        c0 = tl.broadcast_to(comb.to(tl.uint32)[None, :, :], shape)                 # 8 a + r
        c1 = tl.broadcast_to(offs_m.to(tl.uint32)[:, None, None], shape)            # i
        c2 = tl.zeros(shape, dtype=tl.uint32) + h.to(tl.uint32)                     # h
        c3 = tl.zeros(shape, dtype=tl.uint32) + b.to(tl.uint32)                     # b
        r0, r1, r2, r3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)                     # 4 x (BM, NA, 8)
        # decision s = 16-bit half s % 2 of word s // 2
        s = slot[None, None, :, None]                                                # (1, 1, NS, 1)
        word = tl.where(s < 2, r0[:, :, None, :], tl.where(s < 4, r1[:, :, None, :],
                        tl.where(s < 6, r2[:, :, None, :], r3[:, :, None, :])))     # (BM, NA, NS, 8)
        u16 = ((word >> ((s % 2) * 16).to(tl.uint32)) & 0xFFFF).to(tl.int32)
        keep = (u16 >= threshold).to(tl.int8)
        # row-major reshape: tile column 64 na + 8 ns + r is key j = start_n + 64 na + 8 ns + r
        return tl.reshape(keep, (BLOCK_M, BLOCK_N)) != 0

    @triton.jit
    def _mask_kernel(OUT, seed_lo, seed_hi, threshold, H, Lq, Lk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Write bernoulli_mask (1 = dropped) with the attention kernels' own tile function."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = _keep_tile(seed_lo, seed_hi, threshold, b, h, offs_m, start_n, BLOCK_M, BLOCK_N)
            ptrs = OUT + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
            tl.store(ptrs, (keep == 0).to(tl.int8),
                     mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, KPM, seed_lo, seed_hi, threshold,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                    skpm, H, Lq, Lk, qk_scale,
                    HAS_KPM: tl.constexpr, HAS_DROP: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BM queries of one (b, h). Online softmax over key tiles (FlashAttention-2).

        Memory traffic per program: read BM*D (Q) + Lk*2D (K, V) + Lk (padding), write BM*D (O)
        + BM (log-sum-exp). Logits are kept in log2 units (qk_scale = log2(e) / sqrt(D)) for exp2."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                           # (BM,)
        offs_d = tl.arange(0, D)                                                   # (D,)
        row_ok = offs_m < Lq
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)                               # (BM, D)
        K += b.to(tl.int64) * skb + h * skh
        V += b.to(tl.int64) * svb + h * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)                # running max
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                               # running sum
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)                             # running sum P V
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)                               # (BN,)
            col_ok = offs_n < Lk
            k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                        mask=col_ok[:, None], other=0.0)                           # (BN, D)  read BN*D
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd,
                        mask=col_ok[:, None], other=0.0)                           # (BN, D)  read BN*D
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # (BM, BN)
            keep = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_KPM:
                pad = tl.load(KPM + b.to(tl.int64) * skpm + offs_n, mask=col_ok, other=1)  # (BN,)
                keep = keep & (pad == 0)[None, :]
            if HAS_DROP:  # PAPER: each logit independently set to -inf with probability p
                keep = keep & _keep_tile(seed_lo, seed_hi, threshold, b, h, offs_m, start_n,
                                         BLOCK_M, BLOCK_N)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))                                  # (BM,)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
            alpha = tl.math.exp2(m_i - m_safe)                                     # rescale old sums
            prob = tl.math.exp2(s - m_safe[:, None])                               # dropped -> 0
            l_i = l_i * alpha + tl.sum(prob, 1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        has_keys = l_i > 0.0                                                       # empty row: zeros
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])                # write BM*D
        # an empty row keeps no logit, so the backward zeros all of its P anyway; +inf rather than
        # -inf keeps exp2(s - lse) at 0 instead of inf should anything ever read it unmasked
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Lq,
                          D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the row term of the softmax backward
        (FlashAttention-2), for BM queries of one (b, h). Read 2*BM*D, write BM."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < Lq
        o = tl.load(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                    mask=row_ok[:, None], other=0.0).to(tl.float32)               # (BM, D)
        do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None] * sdom
                     + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=row_ok)

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, seed_lo, seed_hi, threshold,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                         sdob, sdoh, sdom, sdod, skpm, H, Lq, Lk, qk_scale, sm_scale,
                         HAS_KPM: tl.constexpr, HAS_DROP: tl.constexpr, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BN keys of one (b, h); loops over query tiles, accumulates dK and dV.

        P is recomputed from Q, K and the saved log-sum-exp, the mask from the seed. Memory traffic:
        read BN*2D (K, V) + Lq*(2D + 2) (Q, dO, lse, delta), write BN*2D (dK, dV)."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)                                   # (BN,)
        offs_d = tl.arange(0, D)
        col_ok = offs_n < Lk
        k = tl.load(K + b.to(tl.int64) * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=col_ok[:, None], other=0.0)                               # (BN, D)
        v = tl.load(V + b.to(tl.int64) * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=col_ok[:, None], other=0.0)                               # (BN, D)
        key_ok = col_ok
        if HAS_KPM:
            pad = tl.load(KPM + b.to(tl.int64) * skpm + offs_n, mask=col_ok, other=1)
            key_ok = key_ok & (pad == 0)
        Q += b.to(tl.int64) * sqb + h * sqh
        DO += b.to(tl.int64) * sdob + h * sdoh
        LSE += bh.to(tl.int64) * Lq
        DELTA += bh.to(tl.int64) * Lq
        dk = tl.zeros((BLOCK_N, D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D), dtype=tl.float32)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)                               # (BM,)
            row_ok = offs_m < Lq
            q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=row_ok[:, None],
                         other=0.0)                                                # (BM, D)
            lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))           # (BM,)
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)                # (BM,)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # (BM, BN)
            keep = tl.broadcast_to(key_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_DROP:  # the forward's mask, regenerated from the seed
                keep = keep & _keep_tile(seed_lo, seed_hi, threshold, b, h, offs_m, start_n,
                                         BLOCK_M, BLOCK_N)
            prob = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)            # (BM, BN) = P
            dv += tl.dot(tl.trans(prob.to(do.dtype)), do, input_precision=PRECISION)  # P^T dO
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                # (BM, BN) dO V^T
            ds = prob * (dp - delta[:, None])                                      # softmax backward
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)   # dS^T Q
        dk = dk * sm_scale
        tl.store(DK + bh.to(tl.int64) * Lk * D + offs_n[:, None] * D + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + bh.to(tl.int64) * Lk * D + offs_n[:, None] * D + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=col_ok[:, None])

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, seed_lo, seed_hi, threshold,
                       sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                       sdob, sdoh, sdom, sdod, skpm, H, Lq, Lk, qk_scale, sm_scale,
                       HAS_KPM: tl.constexpr, HAS_DROP: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """One program: BM queries of one (b, h); loops over key tiles, accumulates dQ.

        A separate kernel instead of atomic adds into dQ: deterministic, at the price of recomputing
        the logits and the mask once more. Traffic: read BM*2D + Lk*2D, write BM*D."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        row_ok = offs_m < Lq
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)                               # (BM, D)
        do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + offs_m[:, None] * sdom
                     + offs_d[None, :] * sdod, mask=row_ok[:, None], other=0.0)    # (BM, D)
        lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
        K += b.to(tl.int64) * skb + h * skh
        V += b.to(tl.int64) * svb + h * svh
        dq = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # (BM, BN)
            keep = tl.broadcast_to(col_ok[None, :], (BLOCK_M, BLOCK_N))
            if HAS_KPM:
                pad = tl.load(KPM + b.to(tl.int64) * skpm + offs_n, mask=col_ok, other=1)
                keep = keep & (pad == 0)[None, :]
            if HAS_DROP:
                keep = keep & _keep_tile(seed_lo, seed_hi, threshold, b, h, offs_m, start_n,
                                         BLOCK_M, BLOCK_N)
            prob = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)            # (BM, BN)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                # (BM, BN)
            ds = prob * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)             # dS K
        dq = dq * sm_scale
        tl.store(DQ + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------
# Launchers and the autograd wrapper

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
# Tile sizes: (BM, BN, num_warps) per kernel. Not tuned on a GPU yet (kernels/BENCH.md). Chosen so
# that every tl.dot has M >= 64 (Hopper's wgmma needs it; with BM = 32 Triton falls back to the older
# mma), BN = 64 uses all 8 decisions of every Philox call, and fp16/bf16 do not spill registers
# when compiled for sm_90 (`python -m kernels.bench --compile-only`; dk/dv at D = 128 takes BN = 32
# for that). fp32 inputs run tl.dot in TF32 if torch.backends.cuda.matmul.allow_tf32 is set, else in
# full fp32 on the CUDA cores, which spills in the dk/dv kernel: use AMP (fp16/bf16) for speed.
# BN must be a power of two >= 16.
FWD_BLOCKS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4)}
BWD_DKDV_BLOCKS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 8)}
BWD_DQ_BLOCKS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 8)}


def _interpreting():
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return triton is not None and isinstance(_fwd_kernel, InterpretedFunction)


_warned = [False]  # warn once about a TRITON_INTERPRET set too late


def _use_triton(device):
    if triton is None:
        if device.type == "cuda":
            raise RuntimeError("masked_attention on CUDA needs Triton (pip install triton)")
        return False
    if device.type == "cuda" or _interpreting():
        return True
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not _warned[0]:
        _warned[0] = True
        warnings.warn("TRITON_INTERPRET is set but kernels.masked_attention was imported before it "
                      "was; Triton reads it when the kernels are defined. Using the PyTorch path "
                      "(same mask). Set it before `import kernels` to run the interpreter.")
    return False



def _precision(dtype):
    # fp32 inputs: follow torch's own matmul setting (TF32 is ~10 bits of mantissa, 2-8x faster)
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bernoulli_mask_triton(seed_lo, seed_hi, threshold, shape, device, blocks=(32, 64)):
    B, H, Lq, Lk = shape
    out = torch.empty(shape, dtype=torch.int8, device=device)
    BM, BN = blocks
    _mask_kernel[(triton.cdiv(Lq, BM), B * H)](out, _i32(seed_lo), _i32(seed_hi), threshold, H, Lq, Lk,
                                               BLOCK_M=BM, BLOCK_N=BN)
    return out.bool()


def _i32(x):
    """uint32 -> the int32 with the same bits, so Triton always types the seed words as i32."""
    return x - 2**32 if x >= 2**31 else x


def _kpm_arg(kpm, q):
    """(pointer, row stride, HAS_KPM) for the padding mask, already int8 (1 = padded) or None."""
    if kpm is None:
        return q, 0, False  # any pointer; HAS_KPM=False compiles the loads away
    return kpm, kpm.stride(0), True


def _forward(q, k, v, kpm, seed_lo, seed_hi, threshold, blocks=None):
    """Launch the forward kernel. Returns O (B, H, Lq, D) in q's dtype and lse (B, H, Lq) fp32."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BM, BN, warps = blocks or FWD_BLOCKS[D]
    o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    kpm_t, skpm, has_kpm = _kpm_arg(kpm, q)
    _fwd_kernel[(triton.cdiv(Lq, BM), B * H)](
        q, k, v, o, lse, kpm_t, _i32(seed_lo), _i32(seed_hi), threshold,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), skpm, H, Lq, Lk, LOG2E / math.sqrt(D),
        HAS_KPM=has_kpm, HAS_DROP=threshold > 0, D=D, BLOCK_M=BM, BLOCK_N=BN,
        PRECISION=_precision(q.dtype), num_warps=warps)
    return o, lse


def _backward(q, k, v, o, lse, do, kpm, seed_lo, seed_hi, threshold, blocks=None):
    """Launch the backward kernels (delta, then dk/dv and dq). Returns dq, dk, dv in the inputs'
    dtype. Deterministic: every gradient element is written by one program, no atomics."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, Lq,
                                                     D=D, BLOCK_M=64)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=q.device)
    kpm_t, skpm, has_kpm = _kpm_arg(kpm, q)
    common = dict(HAS_KPM=has_kpm, HAS_DROP=threshold > 0, D=D, PRECISION=_precision(q.dtype))
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), skpm, H, Lq, Lk,
            LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    seed = (_i32(seed_lo), _i32(seed_hi), threshold)
    BM, BN, warps = blocks[1] if blocks else BWD_DKDV_BLOCKS[D]
    _bwd_dkdv_kernel[(triton.cdiv(Lk, BN), B * H)](
        q, k, v, do, lse, delta, dk, dv, kpm_t, *seed, *args,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, **common)
    BM, BN, warps = blocks[2] if blocks else BWD_DQ_BLOCKS[D]
    _bwd_dq_kernel[(triton.cdiv(Lq, BM), B * H)](
        q, k, v, do, lse, delta, dq, kpm_t, *seed, *args,
        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, **common)
    return dq, dk, dv


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, seed_lo, seed_hi, threshold, blocks):
        o, lse = _forward(q, k, v, kpm, seed_lo, seed_hi, threshold, blocks[0] if blocks else None)
        ctx.save_for_backward(q, k, v, o, lse, kpm)  # saved: O(B*H*(Lq + Lk)*D), no Lq*Lk tensor
        ctx.rng = (seed_lo, seed_hi, threshold)
        ctx.blocks = blocks
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, kpm, *ctx.rng, blocks=ctx.blocks)
        return dq, dk, dv, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# The public function

def masked_attention(q, k, v, p, seed, key_padding_mask=None, _blocks=None):
    """softmax(mask(Q K^T / sqrt(D))) V with each logit set to -inf with probability p.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); fp32, fp16 or bf16, same dtype and device.
    p: float in [0, 1]. seed: int in [0, 2**64); the mask is bernoulli_mask(seed, (B, H, Lq, Lk), p),
       a pure function of (seed, b, h, i, j): use a new seed for every call that needs a fresh mask.
    key_padding_mask: optional (B, Lk) bool, True = padded key (never attended to).
    Returns (B, H, Lq, D) in q's dtype, differentiable in q, k and v; rows with no surviving key
    are zeros with zero gradients.

    `_blocks` (tests and benchmarks only): ((BM, BN, warps) forward, dk/dv, dq) tile overrides."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != (B, H, Lk, D) or v.shape != (B, H, Lk, D):
        raise ValueError(f"k and v must be (B, H, Lk, D) = ({B}, {H}, Lk, {D}) like q; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16,
                                                                torch.bfloat16):
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Lk) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a (B, Lk) = ({B}, {Lk}) bool tensor "
                             f"(True = padded); got {tuple(key_padding_mask.shape)} "
                             f"{key_padding_mask.dtype}")
        key_padding_mask = key_padding_mask.to(q.device)
    seed_lo, seed_hi, threshold = _check_seed_p(seed, p)
    if not _use_triton(q.device) or B * H * Lq * Lk == 0:
        return masked_attention_reference(q, k, v, p, seed, key_padding_mask)
    if D not in HEAD_DIMS:
        raise ValueError(f"the Triton kernel supports head dims {HEAD_DIMS}, got D = {D}")
    if q.dtype == torch.bfloat16 and not q.is_cuda:  # Triton 3.9's interpreter: tl.dot on bf16 is wrong
        raise TypeError("the Triton interpreter cannot multiply bfloat16 tiles (it holds them as "
                        "uint16); use float16/float32 under TRITON_INTERPRET=1, or run on CUDA")
    kpm8 = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    return _MaskedAttention.apply(q, k, v, kpm8, seed_lo, seed_hi, threshold, _blocks)  # (B,H,Lq,D)


# ---------------------------------------------------------------------------------------------------
# Correctness check and a quick timing: python kernels/masked_attention.py

if __name__ == "__main__":
    import time

    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = "Triton (CUDA)" if device == "cuda" else (
        "Triton interpreter" if _interpreting() else "plain PyTorch")
    print(f"device {device}, path: {path}")
    # the check: masked_attention against PyTorch's own attention given bernoulli_mask's mask
    torch.manual_seed(0)
    B, H, Lq, Lk, D, p, seed = 2, 2, 37, 53, 32, 0.1, 1234
    kpm = torch.zeros(B, Lk, dtype=torch.bool, device=device)
    kpm[1, 40:] = True                                                      # a padded image
    allowed = ~bernoulli_mask(seed, (B, H, Lq, Lk), p, device) & ~kpm[:, None, None, :]
    assert allowed.any(-1).all(), "the check assumes no empty row"
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
                   for L in (Lq, Lk, Lk))
        out = masked_attention(q, k, v, p, seed, key_padding_mask=kpm)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=allowed)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q32, k32, v32))
        errs = [(out.float() - ref).abs().max().item()] + [
            (g.float() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
        status = "ok" if max(errs) < tol else "FAIL"
        print(f"{str(dtype):14s} max |err| out/dq/dk/dv vs SDPA with the mask = "
              + " ".join(f"{e:.1e}" for e in errs) + f"  (tolerance {tol:g}) {status}")
    if _interpreting():
        raise SystemExit("no timing under the interpreter: it would time numpy, not the kernel")
    B, H, Lq, Lk, D = (8, 8, 200, 600, 64) if device == "cuda" else (2, 8, 100, 300, 32)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
               for L in (Lq, Lk, Lk))
    for it in range(4):  # the first call compiles
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        masked_attention(q, k, v, 0.1, seed=it).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    print(f"B={B} H={H} Lq={Lq} Lk={Lk} D={D} {dtype}: forward+backward {dt * 1e3:.2f} ms "
          f"(one call; python -m kernels.bench for the benchmark)")
