"""MLA attention for many absorbed queries (prefill chunks) in one Triton launch, flash-attention style.

The contract is `kimi_desk.kernels.mla.mla_attention`'s: absorbed queries q [B, Tq, H, D] against the
cache [B, Tk, D], the value of key s being cache[s, :V]; query i at position q_start + i sees keys
0 .. q_start + i; the output is float32 [B, Tq, H, V]. At the 48B shapes D = 576 (latent 512 + rope 64),
V = 512, H = 32.

Why a kernel: the PyTorch form `mla_attention_dense` materialises every score ([B, Tq * H, Tk] float32:
1 TiB for a chunk of 8192 queries over 1M cached tokens), and the expanded prefill `mla_prefill_sdpa`
expands every cached key and value again for every chunk (9 GiB at 128k tokens, 72 GiB at 1M). Here the
only memory is the output, whatever the cache's length, and each row block reads only the keys it sees.

`mla_prefill_fwd_kernel`, one program per (row block, value slice, batch):

- The rows are the Tq * H (query, head) pairs of one sequence, query-major and head-minor, as they lie
  in q: a block of BM rows holds BM / H whole queries (2 at H = 32 and BM = 64) with all their heads.
  Every head reads the same keys (MQA), so a key tile, once loaded, serves all of them: the keys are read
  once per row block, not once per head.
- The program walks the keys in blocks of BN, from key 0 to the last key its last query sees: first the
  blocks that every row sees whole (no mask), then the diagonal ones (the causal mask). Keys after the
  last query's position are never touched, so a triangle (q_start = 0) costs half the square, and the
  cache may be a buffer longer than the keys (rows past the last query need not hold finite values).
- Online softmax in fp32: running max and sum per row, base 2, log2(e) folded into the scale.
- Scores [BM, BN] = q [BM, D] x keys^T [D, BN], the feature axis cut at V into two dots into one fp32
  accumulator, [c | k_r] = [V | D - V] (512 + 64). The first piece of the key tile is the value tile:
  acc [BM, V] += p [BM, BN] x c [BN, V] uses it again from shared memory, so each key tile is loaded
  once and used twice, and q is loaded once per program.

The plain orientation (rows down, features across), not decode.py's transposed one: here the rows fill
the tensor core's M side by themselves (64 per warpgroup), and p stays in registers as the left operand
of the value product (Hopper's wgmma takes A from registers; the transposed form would have to write
p^T to shared memory every block).

Why the whole value width in one program, rather than slices of it on a grid axis: the accumulator
[BM, V] = [64, 512] fp32 is 128 KB, 128 registers a thread at 8 warps (two warpgroups, each the 64 rows
x 256 features of one wgmma: FlashMLA's layout), which leaves room for the scores (8 registers) and the
rest within the 255 a thread can have; decode.py's WIDE_CONFIG holds the same accumulator and compiles
without spilling. Slices of BV = 128 would each recompute the scores: 4 x 576 + 512 = 2816
multiply-adds per row and key against 1088, 2.6x the work, in a kernel meant to be bound by that work.
(A 64-row block does 121 FLOPs per key byte it loads, under the H100's 265 per byte of HBM (800 TFLOP/s,
3 TB/s); but the programs running together walk the same key range at about the same pace, so HBM sees
each key tile a few times and L2 serves the rest. More rows per block would raise it, and take
registers the accumulator does not leave.) The slices remain as a setting (block_v), for a compiler that
does spill: each slice loads its own value columns beside the full key tile.

Shared memory at DEFAULT_CONFIG on an H100: q [64, 576] bf16, 72 KB, loaded once; key tiles [32, 576]
bf16, 36 KB a stage, three stages: 180 KB of the 227 KB a program may have. Key blocks of 64 with two
stages would take 216 KB.

No key splits (decode.py's split-K): a prefill chunk has rows enough to fill the GPU (8192 queries x
32 heads = 4096 row blocks of 64, 31 per SM of an H100). A call with few row blocks (tens of queries) against
a long cache occupies few SMs, each walking all the keys; decode.py's split-K kernel suits it better.
Row blocks are launched last first, so that the longest (most keys, on a triangle) start first and the
shortest fill the tail; neighbours read the same key tiles at about the same time, from L2.

The grid is fixed by the shapes alone; the key range of each row block comes from the first query's
position, an int or a one-element device tensor read by the kernel (as in decode.py), so nothing asks
the host anything.

Precision: the products run in the cache's dtype with fp32 accumulation, p rounded to it for the value
product, like `mla_attention_dense` and decode.py; the scale is applied to the fp32 scores. Under
Triton's interpreter (3.9), which multiplies bf16 dot operands as their raw bits, the operands are fp32
holding the same rounded values, with input_precision "tf32" (exact for bf16 and fp16 values); not on
the GPU, where fp32 operands would double the shared memory (q alone 144 KB) and halve the tensor cores'
rate, as kernels/quant/gemv.py, bound by its weight bytes, can afford and this kernel cannot. An fp32
cache takes "ieee" dots (exact fp32, on the CUDA cores) and smaller blocks (FP32_CONFIG): for tests and
checks; the model runs bf16 on a GPU.

Not yet measured on a GPU (packaging/gpu_checks/mla_prefill.py checks and times it at the 48B shapes),
and not yet on the model's path: kimi_desk.kernels.mla dispatches to it from PREFILL_KERNEL_MIN_QUERIES
absorbed queries, and the model's chunks of 64 tokens or more take the expanded form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels.mla.decode import _absorbed_rows


@triton.jit
def _load_key_tile(p, m_n, m_f, MASK_N: tl.constexpr, MASK_F: tl.constexpr):
    # Masks only on the axes that need them: whole tiles of the real shapes (powers of two, key blocks
    # before the diagonal) load without any, 16 bytes at a time.
    if MASK_N and MASK_F:
        b = tl.load(p, mask=m_n[:, None] & m_f[None, :], other=0.0)
    elif MASK_N:
        b = tl.load(p, mask=m_n[:, None], other=0.0)
    elif MASK_F:
        b = tl.load(p, mask=m_f[None, :], other=0.0)
    else:
        b = tl.load(p)
    return b


@triton.jit
def _attend_key_block(
    b_acc,
    b_m,
    b_l,
    b_q,
    b_qr,
    p_cb,
    j,
    n_end,
    b_pos,
    stride_ct,
    qk_scale,
    o_f,
    o_d,
    o_v,
    m_f,
    m_d,
    m_v,
    D: tl.constexpr,
    V: tl.constexpr,
    BN: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    SPLIT_V: tl.constexpr,
    MASKED: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block [j, j + BN) for the program's rows: scores, online softmax, values. MASKED: the
    block may hold keys that some row does not see (the diagonal), or keys past n_end (never loaded)."""
    R: tl.constexpr = D - V
    o_n = j + tl.arange(0, BN)
    m_n = o_n < n_end
    # int64 rows: 1M keys x a row stride of 576 overflows int32 once B > 3.
    p_c = p_cb + o_n.to(tl.int64)[:, None] * stride_ct
    b_c = _load_key_tile(p_c + o_f[None, :], m_n, m_f, MASKED, BF != V).to(OP_DT)
    b_kr = _load_key_tile(p_c + V + o_d[None, :], m_n, m_d, MASKED, BR != R).to(OP_DT)
    # Scores [BM, BN] = [q_c | q_r] [BM, D] x [c | k_r]^T [D, BN]
    b_s = tl.dot(b_q, tl.trans(b_c), input_precision=DOT_PRECISION)
    b_s = tl.dot(b_qr, tl.trans(b_kr), b_s, input_precision=DOT_PRECISION)
    b_s = b_s * qk_scale
    if MASKED:
        # Keys past n_end lie after every row's position, so this hides them too (they loaded as 0).
        b_s = tl.where(o_n[None, :] <= b_pos[:, None], b_s, float("-inf"))
    # The first block a program takes holds key 0, which every row sees, so m is finite from then on
    # and exp2 never meets -inf - -inf.
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if SPLIT_V:
        # This program's value columns, loaded beside the key tile (from L1 or L2: the same rows).
        b_v = _load_key_tile(p_c + o_v[None, :], m_n, m_v, MASKED, V % BV != 0).to(OP_DT)
    else:
        # The values are the key tile's first V columns: the same tile, used again.
        b_v = b_c
    b_acc = tl.dot(b_p.to(OP_DT), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_acc, b_m_new, b_l


# The first query's position changes with every chunk and the row count with the last one; specialising
# on their divisibility would only compile the kernel again.
@triton.jit(do_not_specialize=["q_start", "M"])
def mla_prefill_fwd_kernel(
    q,
    cache,
    out,
    qk_scale,
    q_start,
    M,
    stride_cb,
    stride_ct,
    H: tl.constexpr,
    D: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BF: tl.constexpr,
    BV: tl.constexpr,
    BR: tl.constexpr,
    SPLIT_V: tl.constexpr,
    Q_START_ON_DEVICE: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_m, i_v, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Last row block first: on a triangle it has the most keys, and the short ones fill the tail.
    i_m = tl.num_programs(0) - 1 - i_m
    R: tl.constexpr = D - V

    if Q_START_ON_DEVICE:
        q_start = tl.load(q_start).to(tl.int32)
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < M
    # Row r is query r // H, which sees the keys up to this position.
    b_pos = q_start + o_r // H
    # Keys 0 .. q_start + the block's first query are seen by every row: the whole key blocks among them
    # need no mask. The block's last query sees up to q_start + its index; nothing after is read.
    n_full = (q_start + (i_m * BM) // H + 1) // BN * BN
    n_end = q_start + (tl.minimum(i_m * BM + BM, M) - 1) // H + 1

    # Features: the value part [0, V) padded to BF, the rest [V, D) padded to BR; output columns of
    # this program's value slice (all of them unless SPLIT_V).
    o_f = tl.arange(0, BF)
    o_d = tl.arange(0, BR)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f = o_f < V
    m_d = o_d < R
    m_v = o_v < V

    # q [B, M, D], contiguous, read once; rows past M load zeros and are never stored.
    p_q = q + (i_b.to(tl.int64) * M + o_r[:, None]) * D
    b_q = tl.load(p_q + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.0).to(OP_DT)
    b_qr = tl.load(p_q + V + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0).to(OP_DT)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BV], dtype=tl.float32)
    p_cb = cache + i_b.to(tl.int64) * stride_cb
    for j in range(0, n_full, BN):
        b_acc, b_m, b_l = _attend_key_block(
            b_acc, b_m, b_l, b_q, b_qr, p_cb, j, n_end, b_pos, stride_ct, qk_scale,
            o_f, o_d, o_v, m_f, m_d, m_v,
            D=D, V=V, BN=BN, BF=BF, BV=BV, BR=BR, SPLIT_V=SPLIT_V, MASKED=False,
            OP_DT=OP_DT, DOT_PRECISION=DOT_PRECISION,
        )
    for j in range(n_full, n_end, BN):
        b_acc, b_m, b_l = _attend_key_block(
            b_acc, b_m, b_l, b_q, b_qr, p_cb, j, n_end, b_pos, stride_ct, qk_scale,
            o_f, o_d, o_v, m_f, m_d, m_v,
            D=D, V=V, BN=BN, BF=BF, BV=BV, BR=BR, SPLIT_V=SPLIT_V, MASKED=True,
            OP_DT=OP_DT, DOT_PRECISION=DOT_PRECISION,
        )

    # Every row sees key 0, so l >= 1; guarded all the same, so that no path divides by 0.
    b_l = tl.where(b_l > 0, b_l, 1.0)
    p_o = out + (i_b.to(tl.int64) * M + o_r[:, None]) * V + o_v[None, :]
    tl.store(p_o, b_acc / b_l[:, None], mask=m_r[:, None] & m_v[None, :])


# Launch settings: rows (query, head pairs) per block, keys per block, value columns per program (None:
# all of them), warps, software-pipeline stages. Chosen by reasoning (module docstring), not yet tuned on
# a GPU: 64 rows fill a warpgroup's wgmma M, 8 warps hold the [64, 512] fp32 accumulator at 128
# registers a thread, and 32-key blocks leave shared memory for three stages.
DEFAULT_CONFIG = dict(block_m=64, block_n=32, block_v=None, num_warps=8, num_stages=3)
# An fp32 cache: fp32 operands take twice the shared memory and "ieee" dots run on the CUDA cores from
# registers, so small blocks (tests and checks only).
FP32_CONFIG = dict(block_m=32, block_n=16, block_v=None, num_warps=4, num_stages=1)


def mla_prefill_absorbed(q, cache, q_start, value_dim, scale, *, out=None, config=None):
    """Absorbed MLA attention for many queries (a prefill chunk) in Triton, with memory bounded by the
    output alone.

    q [B, Tq, H, D] (any float dtype; rounded to the cache's); cache [B, Tk, D] bf16, fp16 or fp32, the
    last axis contiguous (a view of a larger buffer is fine), Tk >= q_start + Tq: rows past the last
    query's position are never read and may hold anything. q_start, the first query's position, is an
    int or a one-element integer tensor on q's device. `out` may name a preallocated float32
    [B, Tq, H, value_dim]. Returns float32 [B, Tq, H, value_dim]. `config` overrides entries of
    DEFAULT_CONFIG (FP32_CONFIG for an fp32 cache).
    """
    B, Tq, H, D = q.shape
    Tk = cache.shape[1]
    V = value_dim
    start_on_device = isinstance(q_start, torch.Tensor)
    if start_on_device:
        assert q_start.numel() == 1 and q_start.device == q.device and not q_start.is_floating_point()
    else:
        assert 0 <= q_start and q_start + Tq <= Tk, "the cache must hold every query's own key"
    assert Tq >= 1 and cache.shape == (B, Tk, D) and 0 < V < D
    assert cache.stride(-1) == 1, "the cache's feature axis must be contiguous"
    assert cache.dtype in (torch.bfloat16, torch.float16, torch.float32), "an fp8 cache goes to mla_decode"
    base = FP32_CONFIG if cache.dtype == torch.float32 else DEFAULT_CONFIG
    cfg = {**base, **(config or {})}

    M = Tq * H
    qk, op_dt, qk_scale = _absorbed_rows(q, cache.dtype, scale)

    BM = min(cfg["block_m"], max(16, triton.next_power_of_2(M)))
    BN = cfg["block_n"]
    BF = max(16, triton.next_power_of_2(V))
    BR = max(16, triton.next_power_of_2(D - V))
    BV = BF if cfg["block_v"] is None else min(BF, max(16, triton.next_power_of_2(cfg["block_v"])))
    # Row blocks on the first axis: it alone takes more than 65535 programs (a chunk of 131072 queries).
    grid = (triton.cdiv(M, BM), triton.cdiv(V, BV), B)

    if out is None:
        out = torch.empty(B, Tq, H, V, dtype=torch.float32, device=q.device)
    assert out.shape == (B, Tq, H, V) and out.dtype == torch.float32 and out.is_contiguous()

    mla_prefill_fwd_kernel[grid](
        qk, cache, out, qk_scale, q_start, M, cache.stride(0), cache.stride(1),
        H=H, D=D, V=V, BM=BM, BN=BN, BF=BF, BV=BV, BR=BR,
        SPLIT_V=BV < BF,
        Q_START_ON_DEVICE=start_on_device,
        OP_DT=op_dt,
        DOT_PRECISION="ieee" if cache.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
