"""MLA decode over the latent cache: split-K (flash-decoding) in two Triton launches.

The contract is `kimi_desk.kernels.mla.mla_attention`'s: absorbed queries q [B, Tq, H, D] against the
cache [B, Tk, D], the value of key s being cache[s, :V]; query i at position q_start + i sees keys
0 .. q_start + i; the output is float32 [B, Tq, H, V]. At the 48B shapes D = 576 (latent 512 + rope 64),
V = 512, H = 32: every head reads the same keys (MQA), so the whole step is one pass over the cache.

1. `mla_decode_fwd_kernel`, one program per (row block, key split, batch). The rows are the Tq * H
   (query, head) pairs of one sequence, which lie contiguously in q. A program walks its split's keys in
   blocks of BN, loading each block once (into shared memory, software-pipelined) and using it twice: for
   the scores of every row at once and, after an online softmax in fp32, for the values. It writes the
   split's normalised partial output and its log-sum-exp (base 2).
2. `mla_decode_combine_fwd_kernel` merges the splits of each row with their log-sum-exps.

Splits give the batch-1 step enough programs to fill the SMs: one sequence's 1M keys are a single
row block, so without them 1 program would read 1.2 GB. The partials cost B * splits * Tq * H * (V + 1)
floats written and read, small beside the cache once a split holds a few key blocks.

The grid is fixed by the shapes alone (the split axis sized to fill the SMs); the kernel derives the
key range, how many splits hold keys and how many key blocks each takes from the first query's
position, which may live in device memory. So a CUDA graph can replay one decode step while the cache
fills (engine/cuda_graph.py), and eager and replayed steps compute exactly the same thing. Splits that
hold no keys write only their log-sum-exps (-inf), and the combine skips their outputs.

Everything is computed transposed, keys and features down the tile, rows across it:
scores^T [BN, BM] = keys [BN, D] x q^T [D, BM], and acc^T [V, BM] += keys^T [V, BN] x p^T [BN, BM].
Hopper's wgmma needs 64 rows down (M) but only 8 across (N). In the plain orientation the 32 heads of a
decode step would be M, padded to 64 (half the products wasted), and the fp32 accumulator [64, 512]
spilled registers; transposed, M is the key block and the 512 latent features, and at DEFAULT_CONFIG
nothing spills (compiled for sm_90 by Triton 3.6: 255 registers, no stack). More rows than one block
holds take several row blocks, which read the same key blocks one after another (from L2 when they run
together: the row block is the grid's fastest axis).

At one query the step is bound by reading the cache. Several queries are bound by each program's work
per key block rather than by bytes: a row block costs nearly a whole pass although its repeated key
blocks come from L2, so 16 queries (8 row blocks) take about 8 one-query passes.

Precision: the products run in the cache's dtype with fp32 accumulation, like `mla_attention_dense`
(an fp32 cache takes 3xTF32 dots, near fp32); the scale is applied to the fp32 scores. An fp8 (e4m3) cache
is widened to bf16 in registers and takes a scale: one float for the whole tensor, or one per token
([B, Tk] float32), applied to the scores and folded into the probabilities for the values. That path is
correct but not tuned: the widened block spills registers, and it runs several times slower than the
bf16 cache (BENCHMARKS-log.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import dot_operand_dtype, pdl_launch
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel

# A split holds at least this many key blocks, so that the partials stay small beside the keys read.
MIN_BLOCKS_PER_SPLIT = 4


def _operand_dtypes(cache_dtype):
    """(Triton, torch) dtype of the dots' operands: the cache's, bf16 for an fp8 cache (widened in
    registers); fp32 operands under the interpreter (dot_operand_dtype)."""
    torch_dt = torch.bfloat16 if cache_dtype == torch.float8_e4m3fn else cache_dtype
    return dot_operand_dtype(torch_dt), torch_dt


def operand_torch_dtype(cache_dtype):
    """The dtype the absorbed queries are rounded to for a cache of cache_dtype."""
    return _operand_dtypes(cache_dtype)[1]


def _absorbed_rows(q, cache_dtype, scale):
    """q [B, Tq, H, D] -> (rows [B, Tq * H, D] rounded as the GPU's operands are (under the interpreter
    held in fp32), the operands' Triton dtype, the score scale in base 2)."""
    B, Tq, H, D = q.shape
    op_dt, q_dt = _operand_dtypes(cache_dtype)
    rows = q.to(q_dt).reshape(B, Tq * H, D)
    rows = (rows.float() if op_dt == tl.float32 else rows).contiguous()
    return rows, op_dt, float(scale) * 1.4426950408889634


# The key range and row count change with every call; specialising on their divisibility would only
# recompile the kernel as the cache grows.
@triton.jit(do_not_specialize=["q_start", "Tk", "min_blocks", "M", "NS"])
def mla_decode_fwd_kernel(
    q,
    cache,
    k_scale,
    o_part,
    lse_part,
    qk_scale,
    q_start,
    Tk,
    min_blocks,
    M,
    NS,
    stride_cb,
    stride_ct,
    stride_sb,
    H: tl.constexpr,
    D: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    Q_START_ON_DEVICE: tl.constexpr,
    PER_TOKEN_SCALE: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_m, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = D - V

    # The key range and its split are worked out here, from the first query's position (a kernel
    # argument, or read from device memory inside a replayed CUDA graph): the grid depends on neither.
    if Q_START_ON_DEVICE:
        q_start = tl.load(q_start).to(tl.int32)
    # Keys past the last query's position are invisible to every row.
    n_keys = tl.minimum(Tk, q_start + M // H)
    n_blocks = tl.cdiv(n_keys, BN)
    # At most NS splits (the grid), each of at least min_blocks key blocks where there are enough; the
    # splits past the last one holding keys find an empty range and only mark their rows empty.
    n_splits = tl.minimum(NS, tl.maximum(1, n_blocks // min_blocks))
    blocks_per_split = tl.cdiv(n_blocks, n_splits)

    # Everything is transposed, keys and features down, rows across (see the module docstring).
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < M
    # Row r is query r // H, which sees the keys up to this position.
    b_pos = q_start + o_r // H
    o_v = tl.arange(0, BV)
    o_d = tl.arange(0, BR)
    m_v = o_v < V
    m_d = o_d < R

    # q [B, M, D], contiguous, read once as q^T [V, BM] and [R, BM]; rows past M load zeros and are
    # never stored.
    p_q = q + (i_b.to(tl.int64) * M + o_r[None, :]) * D
    b_qt = tl.load(p_q + o_v[:, None], mask=m_v[:, None] & m_r[None, :], other=0.0).to(OP_DT)
    b_qrt = tl.load(p_q + V + o_d[:, None], mask=m_d[:, None] & m_r[None, :], other=0.0).to(OP_DT)

    start = i_s * blocks_per_split * BN
    end = tl.minimum(start + blocks_per_split * BN, n_keys)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BV, BM], dtype=tl.float32)
    p_cb = cache + i_b.to(tl.int64) * stride_cb
    for j in range(start, end, BN):
        o_n = j + tl.arange(0, BN)
        m_n = o_n < end
        # int64 rows: 1M keys x a row stride of 576 overflows int32 once B > 3.
        p_c = p_cb + o_n.to(tl.int64)[:, None] * stride_ct
        # Masks only on the key axis where the feature widths are powers of two (the real shapes), so
        # that the loads stay 16 bytes wide.
        if BV == V:
            b_c = tl.load(p_c + o_v[None, :], mask=m_n[:, None], other=0.0).to(OP_DT)
        else:
            b_c = tl.load(p_c + o_v[None, :], mask=m_n[:, None] & m_v[None, :], other=0.0).to(OP_DT)
        if BR == R:
            b_kr = tl.load(p_c + V + o_d[None, :], mask=m_n[:, None], other=0.0).to(OP_DT)
        else:
            b_kr = tl.load(p_c + V + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0).to(OP_DT)
        # Scores^T [BN, BM] = [c | k_r] [BN, D] x q^T [D, BM]
        b_st = tl.dot(b_c, b_qt, input_precision=DOT_PRECISION)
        b_st = tl.dot(b_kr, b_qrt, b_st, input_precision=DOT_PRECISION)
        if PER_TOKEN_SCALE:
            b_ks = tl.load(k_scale + i_b.to(tl.int64) * stride_sb + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_st = b_st * b_ks[:, None]
        b_st = b_st * qk_scale
        b_st = tl.where(m_n[:, None] & (o_n[:, None] <= b_pos[None, :]), b_st, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_st, 0))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 from
        # turning -inf - -inf into NaN (its p and correction are 0 either way).
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_pt = tl.exp2(b_st - b_m_use[None, :])
        b_alpha = tl.exp2(b_m - b_m_use)
        b_l = b_l * b_alpha + tl.sum(b_pt, 0)
        if PER_TOKEN_SCALE:
            b_pt = b_pt * b_ks[:, None]
        # acc^T [V, BM] += c^T [V, BN] x p^T [BN, BM]: the same key block, read from shared memory again.
        b_acc = tl.dot(tl.trans(b_c), b_pt.to(OP_DT), b_acc * b_alpha[None, :], input_precision=DOT_PRECISION)
        b_m = b_m_new

    # A row with no visible key in this split (a later split of an early query, or a split past the
    # keys) writes only lse -inf: the combine gives it weight 0 and never reads its output.
    b_has = b_l > 0
    b_l = tl.where(b_has, b_l, 1.0)
    b_lse = tl.where(b_has, b_m + tl.log2(b_l), float("-inf"))
    r_out = (i_b.to(tl.int64) * NS + i_s) * M + o_r
    tl.store(
        o_part + r_out[None, :] * V + o_v[:, None], b_acc / b_l[None, :], mask=m_v[:, None] & (m_r & b_has)[None, :]
    )
    tl.store(lse_part + r_out, b_lse, mask=m_r)


@triton.jit(do_not_specialize=["M", "NS"])
def mla_decode_combine_fwd_kernel(
    o_part,
    lse_part,
    out,
    out_scale,
    M,
    NS,
    V: tl.constexpr,
    BS: tl.constexpr,
    BV: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_v, i_r, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    r0 = i_b.to(tl.int64) * NS * M + i_r

    # Every row sees key 0, which lies in split 0, so the largest log-sum-exp is finite.
    b_max = tl.full([BS], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NS, BS):
        o_s = s0 + tl.arange(0, BS)
        b_max = tl.maximum(b_max, tl.load(lse_part + r0 + o_s * M, mask=o_s < NS, other=float("-inf")))
    b_top = tl.max(b_max, 0)

    b_acc = tl.zeros([BV], dtype=tl.float32)
    b_den = tl.zeros([BS], dtype=tl.float32)
    for s0 in range(0, NS, BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < NS
        b_lse = tl.load(lse_part + r0 + o_s * M, mask=m_s, other=float("-inf"))
        b_w = tl.exp2(b_lse - b_top)
        r_s = r0 + o_s.to(tl.int64) * M
        # Splits that saw no key for this row wrote no output.
        m_o = m_s & (b_lse > float("-inf"))
        b_o = tl.load(o_part + r_s[:, None] * V + o_v[None, :], mask=m_o[:, None] & m_v[None, :], other=0.0)
        b_acc += tl.sum(b_w[:, None] * b_o, 0)
        b_den += b_w
    b_out = b_acc / tl.sum(b_den, 0) * out_scale
    tl.store(out + (i_b.to(tl.int64) * M + i_r) * V + o_v, b_out, mask=m_v)


# Launch settings: rows (query, head pairs) per block, keys per block, warps, software-pipeline stages,
# programs per SM to aim for, and the fewest key blocks a split may hold. Chosen on an H100 by
# packaging/bench/kernels.py (part mla; BENCHMARKS.md, "MLA decode (H100)"). One decode step (32 heads, 32 rows):
# the program holds 188 KB of shared memory (q^T and two stages of 64 x 576 bf16 keys), so one runs per
# SM and one wave of splits fills the chip (1M keys: 459 us; 8 warps 606 us, 32-key blocks 466 us).
DEFAULT_CONFIG = dict(block_m=32, block_n=64, num_warps=4, num_stages=2, waves=1, min_blocks=MIN_BLOCKS_PER_SPLIT)
# More rows (several queries): 64 rows a block halve the passes over each key block, and the smaller key
# block (152 KB of shared memory) leaves room for a third stage (16 queries at 128k: 711 us, against
# 1236 us with DEFAULT_CONFIG).
WIDE_CONFIG = dict(block_m=64, block_n=32, num_warps=8, num_stages=3, waves=2, min_blocks=MIN_BLOCKS_PER_SPLIT)
_SM_COUNT = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        # The interpreter: a few splits, so that CPU tests go through the combine.
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def mla_decode(q, cache, q_start, value_dim, scale, *, k_scale=None, out=None, num_splits=None, config=None):
    """Absorbed MLA attention for a few queries (decode, speculative decode) in Triton.

    q [B, Tq, H, D] (any float dtype); cache [B, Tk, D] bf16, fp16, fp32 or float8_e4m3fn, the last axis
    contiguous (a view of a larger buffer is fine, and so is a buffer longer than the keys: those past
    the last query's position are never read); k_scale: with an fp8 cache, a float for the whole cache
    or a [B, Tk] float32 tensor, one per token. q_start, the first query's position, is an int or a
    one-element integer tensor on q's device (read by the kernel, so that a CUDA graph replays the call
    as the cache fills). `out` may name a preallocated float32 [B, Tq, H, value_dim]. Returns float32
    [B, Tq, H, value_dim]. `config` overrides entries of DEFAULT_CONFIG (up to 32 rows) or WIDE_CONFIG;
    `num_splits` sets the split count.

    The launch depends only on the shapes: the kernel works out the key range and the blocks per split
    itself, so the same inputs give the same result whether q_start is an int or a tensor.
    """
    B, Tq, H, D = q.shape
    Tk = cache.shape[1]
    V = value_dim
    start_on_device = isinstance(q_start, torch.Tensor)
    if start_on_device:
        assert q_start.numel() == 1 and q_start.device == q.device and not q_start.is_floating_point()
    else:
        assert q_start >= 0
    assert cache.shape == (B, Tk, D) and 0 < V < D and Tk >= 1
    assert cache.stride(-1) == 1, "the cache's feature axis must be contiguous"
    fp8 = cache.dtype == torch.float8_e4m3fn
    assert fp8 or k_scale is None, "k_scale goes with an fp8 cache"
    base = DEFAULT_CONFIG if Tq * H <= DEFAULT_CONFIG["block_m"] else WIDE_CONFIG
    cfg = {**base, **(config or {})}

    M = Tq * H
    qk, op_dt, qk_scale = _absorbed_rows(q, cache.dtype, scale)
    out_scale = 1.0
    per_token = isinstance(k_scale, torch.Tensor)
    if per_token:
        assert k_scale.shape == (B, Tk)
        k_scale = k_scale.float()
        assert k_scale.stride(-1) == 1
    elif k_scale is not None:
        qk_scale *= float(k_scale)
        out_scale = float(k_scale)

    BM = min(cfg["block_m"], max(16, triton.next_power_of_2(M)))
    BN = cfg["block_n"]
    BV = max(16, triton.next_power_of_2(V))
    BR = max(16, triton.next_power_of_2(D - V))
    n_m = triton.cdiv(M, BM)
    # The grid's splits: enough programs to fill the SMs; the kernel uses fewer when the keys are few
    # (each split at least min_blocks key blocks).
    if num_splits is None:
        NS, min_blocks = max(1, triton.cdiv(cfg["waves"] * _sm_count(q.device), B * n_m)), cfg["min_blocks"]
    else:
        NS, min_blocks = num_splits, 1

    o_part = torch.empty(B, NS, M, V, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, NS, M, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(B, Tq, H, V, dtype=torch.float32, device=q.device)
    assert out.shape == (B, Tq, H, V) and out.dtype == torch.float32 and out.is_contiguous()

    mla_decode_fwd_kernel[(n_m, NS, B)](
        qk,
        cache,
        k_scale if per_token else qk,
        o_part,
        lse_part,
        qk_scale,
        q_start,
        Tk,
        min_blocks,
        M,
        NS,
        cache.stride(0),
        cache.stride(1),
        k_scale.stride(0) if per_token else 0,
        H=H,
        D=D,
        V=V,
        BM=BM,
        BN=BN,
        BV=BV,
        BR=BR,
        Q_START_ON_DEVICE=start_on_device,
        PER_TOKEN_SCALE=per_token,
        OP_DT=op_dt,
        DOT_PRECISION="tf32x3" if cache.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **pdl_launch(q),
    )
    BVC = min(128, BV)
    mla_decode_combine_fwd_kernel[(triton.cdiv(V, BVC), M, B)](
        o_part,
        lse_part,
        out,
        out_scale,
        M,
        NS,
        V=V,
        BS=min(32, triton.next_power_of_2(NS)),
        BV=BVC,
        num_warps=4,
        **pdl_launch(q),
    )
    return out
