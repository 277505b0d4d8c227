"""The routed experts of many tokens (prefill) as a grouped GEMM: two Triton launches whose grid depends
on the shapes alone, no host synchronisation (vLLM's fused_moe idea). Formula and layout as in naive.py.

1. Routing, in PyTorch on the device (`route_pairs`). The N * k (token, chosen expert) pairs,
   p = n * k + j, are sorted by expert (a stable argsort of ids), so each expert's pairs form one run of
   `order`: counts[e] pairs from pair_start[e]. Each run is cut into row blocks of BM pairs, the last
   one partial: ceil(counts[e] / BM) blocks from block_start[e], and block_expert[b] names row block b's
   expert (a searchsorted on the blocks' cumulative count). The grid takes a bound from the shapes,
   cdiv(N k, BM) + min(E, N k) (the whole blocks, plus one partial block per chosen expert); blocks past
   the real total get expert E and return at once. Counts come from scatter_add_ (bincount and unique
   would ask the host for a size).
2. `moe_grouped_gate_up_fwd_kernel`, one program per (row block, BN rows of the hidden width I): the
   block's pairs' tokens x[n] [BM, BK] (rows gathered) against expert e's w1 and w3 tiles [BK, BN]
   along D, two fp32 accumulators; the scales s1, s3 on the fp32 sums; h = SiLU(gate) * up, stored in
   x's dtype at h[p] ([N k, I], rows by pair, so the second launch needs no other index).
3. `moe_grouped_down_fwd_kernel`, one program per (row block, BN output features of D): h[p] [BM, BK]
   against w2[e] tiles [BK, BN] along I, times s2 and the pair's mixing weight, into fp32 y[p]
   ([N k, D]); one sum over k (y viewed [N, k, D]) gives the output: no atomics, so the result does not
   depend on the order the programs run in.

Both grids are one axis, column blocks fastest: programs that run together are the column blocks of a
few neighbouring row blocks, which share their gathered x (or h) rows and, mostly, their expert, so each
x row block and each expert's weights come from HBM about once and from L2 for the rest (a 2-D grid with
row blocks first would read x from HBM once per column block).

fp8 or int8 weights (scales given, format in kernels/quant): tiles are loaded as one byte a weight and
converted in registers to the dots' operand dtype, exactly (e4m3 and int8 values are exact in bf16 and
fp16); each output row's fp32 sum is multiplied by its scale, s1 and s3 before SiLU(gate) * up, s2 on the
down rows. int4 weights (a bf16 scale and midpoint per group of inputs): a tile of inputs lies inside one
group, its bytes are unpacked in registers into codes (exact in the operand dtype), multiplied by x as
they are, and the group's scale and midpoint are applied to the tile's product and x's row sums
(kernels/quant/int4_tiles.py): a dequantized weight is never formed. SCALED and INT4 are constexprs, so
the kernels without them carry no trace of them.

Precision: dots with operands in x's dtype (fp8 weights widened to it) and fp32 accumulation; h is
rounded to x's dtype between the two products, as the PyTorch path rounds it. fp32 x takes "ieee" dots
(exact fp32; tests and checks, not the model's GPU path). Under Triton's interpreter, which computes bf16
dots wrongly, the operands are fp32 holding the same rounded values (as in kernels/mla/decode.py).
Sizes and timings at the 48B shapes: BENCHMARKS-log.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import dot_operand_dtype
from kimi_desk.kernels.moe.naive import kernel_operands
from kimi_desk.kernels.quant.int4_tiles import CODE_OFFSET, int4_block, int4_codes


@triton.jit
def _load_tile(p, m_rows, m_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # Masks only on the axes that need them: the 48B shapes divide into whole tiles, whose weight tiles
    # then load without any, 16 bytes at a time.
    if MASK_ROWS and MASK_COLS:
        b = tl.load(p, mask=m_rows[:, None] & m_cols[None, :], other=0.0)
    elif MASK_ROWS:
        b = tl.load(p, mask=m_rows[:, None], other=0.0)
    elif MASK_COLS:
        b = tl.load(p, mask=m_cols[None, :], other=0.0)
    else:
        b = tl.load(p)
    return b


@triton.jit
def _row_block_pairs(i_b, i_e, order, block_start, pair_start, counts, BM: tl.constexpr):
    """Row block i_b of expert i_e: its BM pair ids (int64; 0 on padding rows) and which are real."""
    o_r = (i_b - tl.load(block_start + i_e)) * BM + tl.arange(0, BM)
    m_r = o_r < tl.load(counts + i_e)
    o_p = tl.load(order + tl.load(pair_start + i_e) + o_r, mask=m_r, other=0)
    return o_p, m_r


@triton.jit
def _int4_tile_product(
    b_x,
    p_codes,
    p_scale,
    p_zero,
    m_bytes,
    m_cols,
    BK: tl.constexpr,
    BN: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """x [BM, BK] @ W [BK, BN] for an int4 W tile inside one group of inputs: its bytes at p_codes
    ([BK / 2, BN], inputs along the rows), the columns' group scales and midpoints at p_scale, p_zero
    [BN]. The codes' product with x, then the scale and the midpoint times x's row sums (int4_tiles.py)."""
    b_p = tl.load(p_codes, mask=m_bytes[:, None] & m_cols[None, :], other=0)
    b_s = tl.load(p_scale, mask=m_cols, other=0.0).to(tl.float32)
    b_z = tl.load(p_zero, mask=m_cols, other=0.0).to(tl.float32)
    b_c = int4_codes(b_p, BK, BN, True).to(OP_DT)
    b_dot = tl.dot(b_x, b_c, input_precision=DOT_PRECISION)
    b_sums = tl.sum(b_x.to(tl.float32), 1)
    return b_dot * b_s[None, :] + b_sums[:, None] * (b_z - CODE_OFFSET * b_s)[None, :]


@triton.jit
def _program_tile(block_expert, COLS: tl.constexpr, BN: tl.constexpr):
    """This program's row block and its expert, and its BN output columns of COLS (which are real). The
    grid is one axis, column blocks fastest (module docstring)."""
    i_pid = tl.program_id(0)
    i_b, i_c = i_pid // tl.cdiv(COLS, BN), i_pid % tl.cdiv(COLS, BN)
    o_c = i_c * BN + tl.arange(0, BN)
    return i_b, tl.load(block_expert + i_b), o_c, o_c < COLS


@triton.jit
def _add_weight_tile(
    b_acc,
    b_x,
    p_w,
    s,
    z,
    i_e,
    o_c,
    m_c,
    k0,
    K: tl.constexpr,
    COLS: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """b_acc [BM, BN] plus x's tile b_x [BM, BK] (inputs k0 to k0 + BK of K) times expert i_e's weight
    rows o_c (of COLS; p_w points at their starts) read as the columns of a [BK, BN] tile. int4: the
    tile's bytes, with the group scales and midpoints s, z (_int4_tile_product)."""
    if INT4:
        # BK inputs inside one group, BK / 2 bytes of each of the tile's columns (int4_tiles.py).
        o_b = k0 // 2 + tl.arange(0, BK // 2)
        p_g = (i_e * COLS + o_c) * (K // GROUP) + k0 // GROUP
        b_acc += _int4_tile_product(
            b_x, p_w + o_b[:, None], s + p_g, z + p_g, o_b < K // 2, m_c, BK, BN, OP_DT, DOT_PRECISION
        )
    else:
        o_k = k0 + tl.arange(0, BK)
        b_w = _load_tile(p_w + o_k[:, None], o_k < K, m_c, K % BK != 0, COLS % BN != 0).to(OP_DT)
        b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PRECISION)
    return b_acc


@triton.jit
def moe_grouped_gate_up_fwd_kernel(
    x,
    w1,
    w3,
    s1,
    s3,
    z1,
    z3,
    h,
    order,
    block_expert,
    block_start,
    pair_start,
    counts,
    n_chosen,
    n_experts,
    D: tl.constexpr,
    I: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SCALED: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b, i_e, o_c, m_c = _program_tile(block_expert, I, BN)
    # Past the real number of row blocks (the grid is a bound): nothing to do.
    if i_e >= n_experts:
        return
    o_p, m_r = _row_block_pairs(i_b, i_e, order, block_start, pair_start, counts, BM)
    o_n = o_p // n_chosen
    # int64 for the expert's offset (e * I * D passes int32 in larger models); within one expert's
    # matrix, int32 is plenty. The experts are contiguous, so the offset is a constant multiple: the
    # compiler knows the tiles' alignment and loads them 16 bytes at a time.
    p_x = x + o_n[:, None] * D
    ROW: tl.constexpr = D // 2 if INT4 else D
    p_w1 = w1 + i_e * (I * ROW) + o_c[None, :] * ROW
    p_w3 = w3 + i_e * (I * ROW) + o_c[None, :] * ROW
    b_gate = tl.zeros([BM, BN], dtype=tl.float32)
    b_up = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BK):
        o_k = d0 + tl.arange(0, BK)
        b_x = _load_tile(p_x + o_k[None, :], m_r, o_k < D, True, D % BK != 0).to(OP_DT)
        # w1[e]'s rows o_c read as the columns of a [BK, BN] tile: gate = x @ w1[e]^T.
        b_gate = _add_weight_tile(
            b_gate, b_x, p_w1, s1, z1, i_e, o_c, m_c, d0, D, I, BK, BN, INT4, GROUP, OP_DT, DOT_PRECISION
        )
        b_up = _add_weight_tile(
            b_up, b_x, p_w3, s3, z3, i_e, o_c, m_c, d0, D, I, BK, BN, INT4, GROUP, OP_DT, DOT_PRECISION
        )
    if SCALED:
        # fp8 rows: the scale once per output element, on the fp32 sum, before the nonlinearity.
        b_gate *= tl.load(s1 + i_e * I + o_c, mask=m_c, other=0.0)[None, :]
        b_up *= tl.load(s3 + i_e * I + o_c, mask=m_c, other=0.0)[None, :]
    b_h = b_gate * tl.sigmoid(b_gate) * b_up
    p_h = h + o_p[:, None] * I + o_c[None, :]
    tl.store(p_h, b_h.to(h.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def moe_grouped_down_fwd_kernel(
    h,
    w2,
    s2,
    z2,
    weights,
    y,
    order,
    block_expert,
    block_start,
    pair_start,
    counts,
    n_experts,
    D: tl.constexpr,
    I: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SCALED: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    OP_DT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_b, i_e, o_c, m_c = _program_tile(block_expert, D, BN)
    if i_e >= n_experts:
        return
    o_p, m_r = _row_block_pairs(i_b, i_e, order, block_start, pair_start, counts, BM)
    p_h = h + o_p[:, None] * I
    ROW: tl.constexpr = I // 2 if INT4 else I
    p_w2 = w2 + i_e * (D * ROW) + o_c[None, :] * ROW
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i0 in range(0, I, BK):
        o_k = i0 + tl.arange(0, BK)
        b_h = _load_tile(p_h + o_k[None, :], m_r, o_k < I, True, I % BK != 0).to(OP_DT)
        b_acc = _add_weight_tile(
            b_acc, b_h, p_w2, s2, z2, i_e, o_c, m_c, i0, I, D, BK, BN, INT4, GROUP, OP_DT, DOT_PRECISION
        )
    if SCALED:
        b_acc *= tl.load(s2 + i_e * D + o_c, mask=m_c, other=0.0)[None, :]
    b_acc *= tl.load(weights + o_p, mask=m_r, other=0.0)[:, None]
    tl.store(y + o_p[:, None] * D + o_c[None, :], b_acc, mask=m_r[:, None] & m_c[None, :])


def route_pairs(ids, num_experts, block_m):
    """The pairs sorted by expert and cut into row blocks of block_m (module docstring, step 1), on the
    device, without asking the host anything. Returns a dict of int64 tensors (order [N k], block_expert
    [num_blocks], block_start, pair_start, counts [E]) and num_blocks, the grid's bound on row blocks."""
    flat = ids.reshape(-1).long()  # [N * k], pair p = n * k + j
    pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    pair_start = counts.cumsum(0) - counts
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    num_blocks = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    # Block b belongs to the first expert whose blocks end after it; past the last block, expert E.
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=ids.device), right=True)
    return dict(
        order=order, block_expert=block_expert, block_start=block_end - blocks, pair_start=pair_start, counts=counts
    ), num_blocks


# Launch settings for both kernels, measured on an H100 (2026-11-27, packaging/bench/gpu_checks/moe_grouped.py,
# Triton 3.6) at the 48B shapes. 8192 tokens (a GPU prefill chunk), fp8 weights / bf16 weights:
#   block_m 128, block_n 64, 4 warps (chosen)   3.70 / 3.18 ms   251 / 292 TFLOP/s
#   block_m 64, block_n 128, 8 warps            4.45 / 3.48 ms   (the first setting, chosen by reasoning)
#   block_m 64, block_n 64, 4 warps             4.00 / 3.85 ms
#   block_m 128, block_n 128, 8 warps           4.77 / 3.17 ms
#   block_m 64, block_k 128, 2 stages           5.73 / 4.04 ms
# At 2048 tokens all lie within 1.6-1.8 ms but the 128-row ones with fp8 at 8 warps (2.2 ms). The
# grouped PyTorch path it replaces: 73 / 94 ms (8192) and 65 / 55 ms (2048), host-bound. 128 rows waste
# more of each expert's last row block (~25% of rows at 8192 tokens) but read each weight tile once for
# twice the rows. block_k = 64: a gate/up pipeline stage is x [128, 64] + w1, w3 [64, 64]; 128 and 64
# divide I = 1024 and D = 2304, so the 48B shapes need no masks on the weight tiles.
DEFAULT_CONFIG = dict(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3)
# fp32 x: "ieee" dots run on the CUDA cores from registers and fp32 tiles take twice the shared memory,
# so small blocks (tests and checks only; the model runs bf16 on a GPU). 4 warps spill with fp8 weights.
FP32_CONFIG = dict(block_m=32, block_n=64, block_k=32, num_warps=8, num_stages=2)
# int4 weights: the unpacked codes take registers; at 128 rows and 4 warps Triton 3.6 spills 800 bytes a
# program (packaging/bench/gpu_checks/compile_sm90.py), at 8 none. 8192 tokens (gpu_checks/quant_kernels.py):
# on an H200 (2026-12-03) 8.95 ms at block_k 64, 7.30 at 128 (fp8 3.52); on an H100 (2026-12-06) 7.43 ms
# at 128 rows and 8 warps, 6.49 at 64 rows and 4 warps (chosen; fp8 3.57). Unpacking bounds it; the
# codes as two halves against x's even and odd inputs (no reordering) took 38 ms.
INT4_CONFIG = {**DEFAULT_CONFIG, "block_m": 64, "num_warps": 4, "block_k": 128}


def routed_experts_grouped_triton(x, ids, weights, w1, w2, w3, scales=None, config=None):
    """kimi_desk.kernels.moe.routed_experts in Triton, for many tokens (prefill). Returns float32 [N, D].

    x [N, D] bf16, fp16 or fp32; w1, w2, w3 in x's dtype, or float8_e4m3fn with scales (s1, s2, s3).
    `config` overrides entries of DEFAULT_CONFIG (FP32_CONFIG for fp32 x): block_m (a power of two, at
    least 16), block_n, block_k, num_warps, num_stages, the same for both kernels.
    """
    (N, k, D, E, I), int4, (s1, s2, s3), (z1, z2, z3) = kernel_operands(x, ids, weights, w1, w2, w3, scales)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    if scales is None:
        assert w1.dtype == w2.dtype == w3.dtype == x.dtype, "unscaled weights must be in x's dtype"
    elif int4:
        assert w1.dtype == w2.dtype == w3.dtype == torch.uint8, "scales and zeros go with int4 codes"
    else:
        assert w1.dtype == w2.dtype == w3.dtype and w1.dtype in (torch.float8_e4m3fn, torch.int8), (
            "scales go with fp8 or int8 weights"
        )
    cfg = {**(FP32_CONFIG if x.dtype == torch.float32 else INT4_CONFIG if int4 else DEFAULT_CONFIG), **(config or {})}
    BM = cfg["block_m"]
    assert BM >= 16 and BM & (BM - 1) == 0, "block_m: a power of two, at least 16 (tl.dot's smallest side)"
    if N == 0:
        return torch.zeros(0, D, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    weights = weights.float().contiguous()
    routing, num_blocks = route_pairs(ids, E, BM)
    h = torch.empty(N * k, I, dtype=x.dtype, device=x.device)
    y = torch.empty(N * k, D, dtype=torch.float32, device=x.device)

    # Tiles no wider than the (padded) matrix, and at least 16: tl.dot's smallest side; int4 tiles of
    # inputs inside one group.
    def tile(setting, width, group=None):
        size = min(cfg[setting], max(16, triton.next_power_of_2(width)))
        return int4_block(size, group) if int4 and group else size

    common = dict(
        SCALED=scales is not None and not int4,
        INT4=int4,
        OP_DT=dot_operand_dtype(x.dtype),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    route = (
        routing["order"],
        routing["block_expert"],
        routing["block_start"],
        routing["pair_start"],
        routing["counts"],
    )
    BN, BK = tile("block_n", I), tile("block_k", D, D // s1.shape[-1] if int4 else None)
    moe_grouped_gate_up_fwd_kernel[(num_blocks * triton.cdiv(I, BN),)](
        x,
        w1,
        w3,
        s1,
        s3,
        z1,
        z3,
        h,
        *route,
        k,
        E,
        D=D,
        I=I,
        BM=BM,
        BN=BN,
        BK=BK,
        GROUP=D // s1.shape[-1] if int4 else 1,
        **common,
    )
    BN, BK = tile("block_n", D), tile("block_k", I, I // s2.shape[-1] if int4 else None)
    moe_grouped_down_fwd_kernel[(num_blocks * triton.cdiv(D, BN),)](
        h,
        w2,
        s2,
        z2,
        weights,
        y,
        *route,
        E,
        D=D,
        I=I,
        BM=BM,
        BN=BN,
        BK=BK,
        GROUP=I // s2.shape[-1] if int4 else 1,
        **common,
    )
    return y.view(N, k, D).sum(1)
