"""The routed experts of a few tokens (decode) in two Triton launches, with no host synchronisation.

Formula and layout as in naive.py. A decode step's MoE is a handful of matrix-vector products over
weights chosen at run time; the grouped PyTorch path asks the host which experts were chosen (a device
synchronisation per layer) and launches three products per expert. Here the chosen ids stay on the device:

1. `moe_gate_up_fwd_kernel`, one program per (token, chosen expert) pair and block of BI rows of the
   expert's hidden width: h = SiLU(w1[e] x) * (w3[e] x) for those rows, reading w1[e] and w3[e] once, in
   tiles [BI, BD] along the model width, with fp32 accumulation. h is kept in fp32 ([N * k, I], small).
2. `moe_down_fwd_kernel`, one program per pair and block of BD output features: w2[e] h times the pair's
   mixing weight, into fp32 partials [N, k, D]; the last of a token's k programs for a block (a counter
   per token and block) sums the k partials in pair order and writes the output: no separate reduce
   launch, and the result does not depend on the order programs run in.

Each chosen expert's weights are read exactly once per token that chose it: at N = 1 (decode) that is
the fewest bytes possible; with several tokens an expert chosen by more than one is read again, mostly
from L2, since programs of the same row block run side by side. The grid is fixed by N, k and the
shapes, so a CUDA graph can replay it with any choice of experts.

fp8 or int8 weights (scales given, format in kernels/quant): each row's fp32 dot times its scale, s1 and
s3 on gate and up before SiLU(gate) * up, s2 on the down rows; the weights are read as one byte each,
half the bytes of bf16. int4 weights (a scale and a midpoint per group): a tile lies inside one group,
its codes are unpacked in registers and multiplied by x as they are, and the group's scale and
midpoint are applied to the tile's sums (kernels/quant/int4_tiles.py). SCALED and INT4 are constexprs,
so the kernels without them compile as before.

Precision: products and accumulations in fp32 on the weights' values, so the bf16 path is slightly more
accurate than PyTorch's (which rounds gate, up and h to bf16, and dequantizes fp8 weights to bf16);
tested against it under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import pdl_launch, zeroed_counters
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.moe.naive import kernel_operands
from kimi_desk.kernels.quant.int4_tiles import int4_piece_inputs, int4_piece_row_sums, int4_pieces


@triton.jit
def moe_gate_up_fwd_kernel(
    x,
    ids,
    w1,
    w3,
    s1,
    s3,
    z1,
    z3,
    h,
    n_chosen,
    stride_we,
    D: tl.constexpr,
    I: tl.constexpr,
    BI: tl.constexpr,
    BD: tl.constexpr,
    SCALED: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    PIECES: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_p, i_i = tl.program_id(0), tl.program_id(1)
    # Pair i_p is token i_p // k with its chosen expert ids[i_p] (ids is [N, k], row-major).
    i_n = (i_p // n_chosen).to(tl.int64)
    i_e = tl.load(ids + i_p).to(tl.int64)
    o_i = i_i * BI + tl.arange(0, BI)
    m_i = o_i < I
    # int64 rows: 256 experts x 1024 x 2304 elements is within int32, larger models would not be.
    ROW: tl.constexpr = D // 2 if INT4 else D
    p_w1 = w1 + i_e * stride_we + o_i.to(tl.int64)[:, None] * ROW
    p_w3 = w3 + i_e * stride_we + o_i.to(tl.int64)[:, None] * ROW
    b_gate = tl.zeros([BI], dtype=tl.float32)
    b_up = tl.zeros([BI], dtype=tl.float32)
    for d0 in range(0, D, BD * PIECES):
        if INT4:
            # PIECES pieces of BD inputs, each in one group.
            o_b, m_b, b_even, b_odd = int4_piece_inputs(x + i_n * D, d0, D, BD, PIECES)
            o_piece = d0 + tl.arange(0, PIECES) * BD
            p_g = (i_e * I + o_i.to(tl.int64))[:, None] * (D // GROUP) + (o_piece // GROUP)[None, :]
            m_piece = o_piece < D
            p_b = o_b[None, :, :]
            b_gate += int4_piece_row_sums(p_w1[:, :, None] + p_b, s1 + p_g, z1 + p_g, m_i, m_piece, m_b, b_even, b_odd)
            b_up += int4_piece_row_sums(p_w3[:, :, None] + p_b, s3 + p_g, z3 + p_g, m_i, m_piece, m_b, b_even, b_odd)
        else:
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_x = tl.load(x + i_n * D + o_d, mask=m_d, other=0.0).to(tl.float32)
            m_w = m_i[:, None] & m_d[None, :]
            b_w1 = tl.load(p_w1 + o_d[None, :], mask=m_w, other=0.0).to(tl.float32)
            b_gate += tl.sum(b_w1 * b_x[None, :], 1)
            b_w3 = tl.load(p_w3 + o_d[None, :], mask=m_w, other=0.0).to(tl.float32)
            b_up += tl.sum(b_w3 * b_x[None, :], 1)
    if SCALED:
        # fp8 rows: the scale once per row, on the fp32 sum, before the nonlinearity.
        b_gate *= tl.load(s1 + i_e * I + o_i, mask=m_i, other=0.0)
        b_up *= tl.load(s3 + i_e * I + o_i, mask=m_i, other=0.0)
    b_h = b_gate * tl.sigmoid(b_gate) * b_up
    tl.store(h + i_p.to(tl.int64) * I + o_i, b_h, mask=m_i)


@triton.jit
def moe_down_fwd_kernel(
    h,
    ids,
    weights,
    w2,
    s2,
    z2,
    partial,
    out,
    counter,
    n_chosen,
    stride_we,
    D: tl.constexpr,
    I: tl.constexpr,
    BD: tl.constexpr,
    BI: tl.constexpr,
    SCALED: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    PIECES: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        wait_for_previous_kernel()
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(ids + i_p).to(tl.int64)
    b_weight = tl.load(weights + i_p).to(tl.float32)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_w2 = w2 + i_e * stride_we + o_d.to(tl.int64)[:, None] * (I // 2 if INT4 else I)
    p_h = h + i_p.to(tl.int64) * I
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for i0 in range(0, I, BI * PIECES):
        if INT4:
            o_b, m_b, b_even, b_odd = int4_piece_inputs(p_h, i0, I, BI, PIECES)
            o_piece = i0 + tl.arange(0, PIECES) * BI
            p_g = (i_e * D + o_d.to(tl.int64))[:, None] * (I // GROUP) + (o_piece // GROUP)[None, :]
            p_b = p_w2[:, :, None] + o_b[None, :, :]
            b_acc += int4_piece_row_sums(p_b, s2 + p_g, z2 + p_g, m_d, o_piece < I, m_b, b_even, b_odd)
        else:
            o_i = i0 + tl.arange(0, BI)
            m_i = o_i < I
            b_h = tl.load(p_h + o_i, mask=m_i, other=0.0)
            b_w2 = tl.load(p_w2 + o_i[None, :], mask=m_d[:, None] & m_i[None, :], other=0.0).to(tl.float32)
            b_acc += tl.sum(b_w2 * b_h[None, :], 1)
    if SCALED:
        b_acc *= tl.load(s2 + i_e * D + o_d, mask=m_d, other=0.0)
    tl.store(partial + i_p.to(tl.int64) * D + o_d, b_acc * b_weight, mask=m_d)
    # Every thread's stores are done (barrier) before the count is released; the last of the token's
    # pairs acquires it before reading the others' partials (from L2).
    tl.debug_barrier()
    i_n = i_p // n_chosen
    p_count = counter + i_n * tl.num_programs(1) + i_d
    if tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") == n_chosen - 1:
        tl.debug_barrier()
        b_sum = tl.zeros([BD], dtype=tl.float32)
        for j in range(0, n_chosen):
            p_part = partial + (i_n * n_chosen + j).to(tl.int64) * D + o_d
            b_sum += tl.load(p_part, mask=m_d, other=0.0, cache_modifier=".cg")
        tl.store(out + i_n.to(tl.int64) * D + o_d, b_sum.to(out.dtype.element_ty), mask=m_d)
        tl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")


# Tile shapes. At the 48B shapes (D = 2304, I = 1024, k = 8 + the shared expert) one token makes 9 x 64
# gate/up programs of 2 x [16, 256] tiles and 9 x 72 down programs of [32, 256]. Measured on an H100
# (2026-11-27, packaging/bench/gpu_checks/fp8_gemv.py, fp8, one token, both launches in a CUDA graph; floor
# 21.2 us): 45.4 us with 4 warps for gate/up, 42.4 with 8 (chosen); 16 x 512 or 32 x 128 gate/up tiles
# and three other down shapes were no faster.
GATE_UP_CONFIG = dict(block_i=16, block_d=256, num_warps=8)
DOWN_CONFIG = dict(block_d=32, block_i=256, num_warps=4)
# int4: a tile's inputs (block_d of gate/up, block_i of down) may span several groups, PIECES pieces of
# one group each (int4_tiles.int4_pieces): more bytes a load, so more of them in flight. Measured on an
# H100 (2026-12-06, packaging/bench/gpu_checks/quant_kernels.py, one token, 8 experts, graph replay):
#   gate/up rows x inputs, warps   down rows x inputs, warps
#   16 x 128, 4                    64 x 128, 4     58.4 us  (tiles of one group: 128 inputs)
#   16 x 256, 4                    64 x 256, 4     46.4
#   16 x 512, 4                    64 x 512, 4     43.2
#   16 x 512, 8                    64 x 512, 8     50.9
#    8 x 256, 4                    16 x 512, 4     41.9
#   32 x 512, 8                    32 x 256, 4     39.9     (chosen; fp8 with its own tiles 39.5)
INT4_GATE_UP_CONFIG = {**GATE_UP_CONFIG, "block_i": 32, "block_d": 512}
INT4_DOWN_CONFIG = DOWN_CONFIG


def routed_experts_gemv(x, ids, weights, w1, w2, w3, scales=None, out_dtype=torch.float32, configs=None):
    """kimi_desk.kernels.moe.routed_experts in Triton, for a few tokens. Returns [N, D] in out_dtype (the
    float32 sum rounded once, in the kernel). `configs` (gate/up, down) overrides the launch settings'
    entries, for the GPU checks' comparisons."""
    (N, k, D, E, I), int4, (s1, s2, s3), (z1, z2, z3) = kernel_operands(x, ids, weights, w1, w2, w3, scales)
    if N == 0:
        return torch.zeros(0, D, dtype=out_dtype, device=x.device)
    x, ids = x.contiguous(), ids.contiguous()
    weights = weights.float().contiguous()
    h = torch.empty(N * k, I, dtype=torch.float32, device=x.device)
    partial = torch.empty(N * k, D, dtype=torch.float32, device=x.device)
    out = torch.empty(N, D, dtype=out_dtype, device=x.device)

    gate_up_config, down_config = (INT4_GATE_UP_CONFIG, INT4_DOWN_CONFIG) if int4 else (GATE_UP_CONFIG, DOWN_CONFIG)
    if configs is not None:
        gate_up_config, down_config = {**gate_up_config, **configs[0]}, {**down_config, **configs[1]}
    # Groups of inputs of w1 and w3 (along D) and of w2 (along I): a piece of a tile lies inside one.
    group_d, group_i = (D // s1.shape[-1], I // s2.shape[-1]) if int4 else (1, 1)
    common = dict(D=D, I=I, SCALED=scales is not None and not int4, INT4=int4, **pdl_launch(x))
    BI = min(gate_up_config["block_i"], triton.next_power_of_2(I))
    BD = min(gate_up_config["block_d"], triton.next_power_of_2(D))
    BD, pieces = int4_pieces(BD, group_d) if int4 else (BD, 1)
    moe_gate_up_fwd_kernel[(N * k, triton.cdiv(I, BI))](
        x,
        ids,
        w1,
        w3,
        s1,
        s3,
        z1,
        z3,
        h,
        k,
        w1.stride(0),
        BI=BI,
        BD=BD,
        GROUP=group_d,
        PIECES=pieces,
        num_warps=gate_up_config["num_warps"],
        **common,
    )
    BD = min(down_config["block_d"], triton.next_power_of_2(D))
    BI = min(down_config["block_i"], triton.next_power_of_2(I))
    BI, pieces = int4_pieces(BI, group_i) if int4 else (BI, 1)
    counters = zeroed_counters(x.device, N * triton.cdiv(D, BD))
    moe_down_fwd_kernel[(N * k, triton.cdiv(D, BD))](
        h,
        ids,
        weights,
        w2,
        s2,
        z2,
        partial,
        out,
        counters,
        k,
        w2.stride(0),
        BD=BD,
        BI=BI,
        GROUP=group_i,
        PIECES=pieces,
        num_warps=down_config["num_warps"],
        **common,
    )
    return out
