"""y = x @ W^T for a few rows of x (decode) in Triton, W quantized and read once: fp8 or int8 rows
(y = x @ (Q * s[:, None])^T), or int4 groups.

Formats as in naive.py: Q [O, D] float8_e4m3fn or int8, one float32 scale per output row s [O]; or int4
codes packed two a byte [O, D / 2] with a bf16 scale and midpoint per group of g inputs. An int4 tile
lies inside one group: its codes are unpacked in registers and multiplied by x as they are, and the
group's scale and midpoint are applied to the tile's sums (int4_tiles.py); everything below holds for
them with half the bytes of fp8. A decode step multiplies one to GEMV_MAX_TOKENS rows by every projection, so it is bound by reading the weights; the
PyTorch form dequantizes first, writing and reading back float32 and x-dtype copies of the weight
(some twenty bytes moved per weight, against one here), then multiplies. Here:

1. `row_scaled_gemv_fwd_kernel`, one program per block of BO output rows and split of the model width: the
   [BO, BD] tiles of Q along its split, each against a [BN = 16, BD] tile of x (all rows at once, padded
   to 16: tl.dot's smallest shape), so every weight byte is read once whatever N is. Q is the dot's
   left operand (a "swap AB" product, [BO, BD] x [BD, BN]): the output rows fill the tensor core's M
   side, the few tokens its narrow N side. The row scale multiplies the fp32 sum at the end, once per
   output element rather than once per weight. One token of fp8, int8 or float rows (a decode step at
   batch 1) takes the CUDA cores instead: each [BO, BD] tile times x, summed along its rows in fp32,
   with no tensor-core operand layout to build and no padding to 16 tokens (ONE_TOKEN_CONFIG).
2. Small O (the 48B model's O = 32, 128, 1024, 2304 at D = 2304 or 4096) gives too few row blocks to keep
   132 SMs reading, so the width is split too (split-K): each split writes fp32 partials [SPLIT, N, O],
   then counts itself done on its row block's counter; the split that finishes last sums the partials in
   split order (no atomics on the values, so the result does not depend on the order programs run in),
   writes y in x's dtype and puts the counter back to zero: a separate sum and cast after the kernel
   would cost two more launches per product, as much GPU time as the kernel itself at the 48B shapes.
   With one split the kernel writes y directly.

The counters are kimi_desk.kernels.zeroed_counters, shared by every call: calls on one stream run one
after another, and each leaves its counters at zero.

The grid depends only on the shapes, and nothing asks the host anything, so a CUDA graph can replay it.
On a Hopper GPU it launches with programmatic dependent launch (kimi_desk.kernels.pdl), as every Triton
kernel of a decode step does: each starts while the one before it finishes and waits for its outputs.

Without a scale, q may be any float weight: the router's float32 weight takes this kernel for its logits
(one launch where PyTorch takes a cast of x and cuBLAS's float32 GEMV).

The dot's operands are fp32: e4m3 values (3 mantissa bits), bf16 and fp16 (7 and 10) are exact in TF32
(10), so input_precision="tf32" gives exact products with fp32 accumulation on the tensor cores, the
same numbers as a bf16 dot would, and faster (the fp8 -> bf16 conversion costs more than fp8 -> fp32).
fp32 x would lose bits
to TF32, so it takes "ieee" (exact, on the CUDA cores; the GPU runs the model in bf16); an fp32 weight
beside bf16 x takes "tf32x3" (the weight's high and low TF32 halves: fp32's accuracy, on the tensor
cores). fp32 operands also keep the kernel testable: Triton's
interpreter (3.9) multiplies bf16 dot operands as their raw uint16 bits, and ignores input_precision.
The interpreter loads and converts float8_e4m3fn natively, except that it reads the NaN codes 0x7F and
0xFF as +-480 (the GPU reads NaN); quantize_fp8_rows never writes them (it clamps to +-448).

Precision: exact products, fp32 sums, one rounding to x's dtype at the end; tested against float64 on the
dequantized weight under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_desk.kernels import dot_operand_dtype, pdl_launch, zeroed_counters
from kimi_desk.kernels.grid_dependency import wait_for_previous_kernel
from kimi_desk.kernels.quant.int4_tiles import CODE_OFFSET, int4_block, int4_codes


@triton.jit
def row_scaled_gemv_fwd_kernel(
    x,
    q,
    scale,
    zero,
    out,
    y,
    counter,
    N,
    stride_x,
    D: tl.constexpr,
    O: tl.constexpr,
    CHUNK: tl.constexpr,
    SPLITS: tl.constexpr,
    BN: tl.constexpr,
    BO: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    SCALED: tl.constexpr,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,
    OP_DT: tl.constexpr,
    CORES: tl.constexpr,
):
    i_o, i_s = tl.program_id(0), tl.program_id(1)
    o_o = i_o * BO + tl.arange(0, BO)
    m_o = o_o < O
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    # int64 rows: the output head's 163840 x 2304 weight is within int32, a larger model's would not be.
    # int4 rows hold two inputs a byte.
    p_q = q + o_o.to(tl.int64)[:, None] * (D // 2 if INT4 else D)
    p_x = x + o_n.to(tl.int64)[:, None] * stride_x
    b_acc = tl.zeros([BO, BN], dtype=tl.float32)
    b_rows = tl.zeros([BO], dtype=tl.float32)
    if PDL:
        wait_for_previous_kernel()
    # Split i_s covers [i_s * CHUNK, (i_s + 1) * CHUNK) of the width; the last one may run past D (masked).
    for d0 in range(0, CHUNK, BD):
        if CORES:
            # One token on the CUDA cores: the weights times x, summed along the rows.
            o_d = i_s * CHUNK + d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_q = tl.load(p_q + o_d[None, :], mask=m_o[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_rows += tl.sum(b_q * tl.load(x + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :], 1)
        elif INT4:
            # BD inputs are BD / 2 bytes, all in one group: the codes' dot with x (in x's type: 128 + q is
            # exact in bf16), then the group's scale and midpoint per row (int4_tiles.py).
            o_b = (i_s * CHUNK + d0) // 2 + tl.arange(0, BD // 2)
            b_p = tl.load(p_q + o_b[None, :], mask=m_o[:, None] & (o_b < D // 2)[None, :], other=0)
            p_g = o_o.to(tl.int64) * (D // GROUP) + (i_s * CHUNK + d0) // GROUP
            b_s = tl.load(scale + p_g, mask=m_o, other=0.0).to(tl.float32)
            b_z = tl.load(zero + p_g, mask=m_o, other=0.0).to(tl.float32)
            o_d = i_s * CHUNK + d0 + tl.arange(0, BD)
            b_x = tl.load(p_x + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :], other=0.0)
            b_c = int4_codes(b_p, BO, BD, False).to(OP_DT)
            b_dot = tl.dot(b_c, tl.trans(b_x.to(OP_DT)), input_precision=PRECISION)
            b_sum = tl.sum(b_x.to(tl.float32), 1)
            b_acc += b_s[:, None] * b_dot + (b_z - CODE_OFFSET * b_s)[:, None] * b_sum[None, :]
        else:
            o_d = i_s * CHUNK + d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_q = tl.load(p_q + o_d[None, :], mask=m_o[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_x = tl.load(p_x + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_acc = tl.dot(b_q, tl.trans(b_x), b_acc, input_precision=PRECISION)
    if CORES:
        b_acc = tl.where(o_n[None, :] == 0, b_rows[:, None], 0.0)
    if SCALED:
        b_acc *= tl.load(scale + o_o, mask=m_o, other=0.0)[:, None]
    b_y = b_acc
    # out is [SPLIT, N, O]: fp32 partials, or y itself (in x's dtype) when there is one split.
    p_out = out + i_s.to(tl.int64) * N * O + o_n[None, :] * O + o_o[:, None]
    m_out = m_o[:, None] & m_n[None, :]
    tl.store(p_out, b_y.to(out.dtype.element_ty), mask=m_out)
    if SPLITS > 1:
        # The split that finishes a row block last sums its partials in split order (deterministic) and
        # writes y: no separate reduce and cast launches. Every thread's stores are done (barrier) before
        # the count is released; the last one acquires it before reading the others' partials (from L2).
        tl.debug_barrier()
        done = tl.atomic_add(counter + i_o, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:
            tl.debug_barrier()
            b_sum = tl.zeros([BO, BN], dtype=tl.float32)
            for i_p in range(0, SPLITS):
                p_part = out + i_p * N * O + o_n[None, :] * O + o_o[:, None]
                b_sum += tl.load(p_part, mask=m_out, other=0.0, cache_modifier=".cg")
            tl.store(y + o_n[None, :] * O + o_o[:, None], b_sum.to(y.dtype.element_ty), mask=m_out)
            # Back to zero for the next call (the counters are reused, a CUDA graph replays them).
            tl.atomic_xchg(counter + i_o, 0, sem="relaxed", scope="gpu")


# Tile shapes. BN = 16 is tl.dot's smallest side. Rows a block, measured on an H100 (2026-11-27,
# packaging/bench/gpu_checks/fp8_gemv.py, one token, in a CUDA graph, each with the split-K of launch_shape):
#   weight [O, D]    64 rows, 3 stages   32 rows, 4 stages (chosen)
#   18432 x 2304     35.7 us             27.5 us   (the dense layer's joined gate/up)
#   12288 x 2304     23.3                20.7      (KDA's six joined projections, about this size)
#    6464 x 2304     17.7                15.4      (MLA's q and latent projection)
#    2304 x 4096     14.8                13.2      (the output projections)
#    2048 x 2304     11.9                10.6
#    1024 x 2304      9.7                 9.3
# No split (16 or 32 rows), 256-wide tiles and 8 warps were slower or no faster at every shape. A
# [32, 128] fp8 tile is 4 KB per load; four stages keep 16 KB of each program's loads in flight.
BLOCK_N = 16
CONFIG = dict(block_o=32, block_d=128, num_warps=4, num_stages=4, cores=False)
# One token (a decode step at batch 1) of fp8, int8 or float rows: on the CUDA cores, 16 rows by 512
# inputs a tile. Measured on an H100 (2026-12-06, packaging/bench/gpu_checks/quant_kernels.py, graph
# replay), against the dots above:
#   weight [O, D]     fp8 dots  fp8 cores   int8 dots  int8 cores
#   12288 x 2304      20.4 us   19.4        26.2       20.6
#    6464 x 2304      15.6      13.9        20.5       15.3
#    2304 x 4096      13.2      12.3        16.7       13.4
#    2304 x 2304      11.2      10.1        12.8       10.8
#  163840 x 2304     150.4     136.8       227.1      143.3      (the output head)
ONE_TOKEN_CONFIG = dict(cores=True, block_o=16, block_d=512)
# int4: 64 rows a block, the codes (128 + q, exact in bf16) multiplied by x in x's own type. On an H100
# (2026-12-06, the same check), one token: 21.2 / 16.3 / 13.4 / 10.4 / 132.9 us at the five shapes above,
# against 38.4 / 28.4 / 22.0 / 14.9 / 386.3 with the codes and x converted to fp32 first, 25.3 / 19.1 /
# 15.5 / 11.7 / 201.9 as two halves of codes against x's even and odd inputs, and 21.8 / 16.3 / 13.2 /
# 11.1 / 137.1 on the CUDA cores (tiles of 256 inputs): the dots, the simplest, stay. On an H200
# (2026-12-03) 64 rows took 24.8 us at 12288 x 2304 against 36.2 with 32; 16 rows or 8 warps were
# twice as slow.
INT4_CONFIG = dict(block_o=64)
# Programs the grid should reach: two per SM of a 132-SM H100, so that while one program waits on its
# loads another one's are in flight on the same SM.
MIN_PROGRAMS = 2 * 132


def launch_shape(O: int, D: int, config: dict | None = None) -> tuple[int, int, int, int, int]:
    """(BO, BD, row blocks, splits, CHUNK) for a weight [O, D]. Splits: as few as give row blocks x splits
    >= min_programs, each the same whole number of BD blocks (rounded down, so the split count rounds up),
    at least one block each; CHUNK is a split's width in elements. `config` overrides CONFIG's entries
    and `min_programs` (1: never split)."""
    config = {**CONFIG, "min_programs": MIN_PROGRAMS, **(config or {})}
    BO = min(config["block_o"], max(16, triton.next_power_of_2(O)))
    BD = min(config["block_d"], max(16, triton.next_power_of_2(D)))
    n_o, n_d = triton.cdiv(O, BO), triton.cdiv(D, BD)
    per_split = max(1, n_d // min(n_d, triton.cdiv(config["min_programs"], n_o)))
    return BO, BD, n_o, triton.cdiv(n_d, per_split), per_split * BD


def row_scaled_gemv(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    config: dict | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """kimi_desk.kernels.quant.row_scaled_linear in Triton: x [..., D] with at most BLOCK_N rows (bf16,
    fp16 or fp32), q [O, D] float8_e4m3fn or int8 contiguous, scale [O] float32. Returns [..., O] in
    out_dtype (default x's dtype). With scale None, q may be any float weight (the router's fp32
    logits: x @ q^T).

    `config` overrides the launch settings (block_o, block_d, num_warps, num_stages, min_programs, and
    `cores` for one token), for the GPU checks' comparisons."""
    O, D = q.shape
    assert scale is None or scale.shape == (O,)
    return _gemv(x, q, scale, None, O, D, config, out_dtype)


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: dict | None = None
) -> torch.Tensor:
    """kimi_desk.kernels.quant.int4_linear in Triton: x [..., D] with at most BLOCK_N rows, packed
    [O, D / 2] uint8, scale and zero [O, D / g] bf16. Returns [..., O] in x's dtype."""
    O, D = packed.shape[0], packed.shape[1] * 2
    assert scale.shape == zero.shape and scale.shape[0] == O and D % scale.shape[1] == 0
    # A tile of inputs lies inside one group.
    config = {**CONFIG, **INT4_CONFIG, **(config or {})}
    config["block_d"] = int4_block(config["block_d"], D // scale.shape[1])
    return _gemv(x, packed, scale.contiguous(), zero.contiguous(), O, D, config, None)


def _gemv(x, q, scale, zero, O, D, config, out_dtype):
    assert x.shape[-1] == D and q.is_contiguous()
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    N = rows.shape[0]
    assert N <= BLOCK_N, f"the GEMV takes at most {BLOCK_N} rows, got {N}"
    y = torch.empty(N, O, dtype=out_dtype or x.dtype, device=x.device)
    if N == 0:
        return y.view(*x.shape[:-1], O)
    int4 = zero is not None
    if scale is not None and not int4:
        scale = scale.float().contiguous()

    config = {**CONFIG, **(ONE_TOKEN_CONFIG if N == 1 and not int4 else {}), **(config or {})}
    BO, BD, n_o, splits, chunk = launch_shape(O, D, config)
    cores = N == 1 and config["cores"] and not int4
    partials = y if splits == 1 else torch.empty(splits, N, O, dtype=torch.float32, device=x.device)
    counters = zeroed_counters(x.device, n_o) if splits > 1 else partials
    extra = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    # TF32 multiplies exactly when neither operand has more than 10 mantissa bits; a float32 weight (the
    # router's) beside such an x takes three TF32 products (its high and low halves: 21 bits, fp32's
    # accuracy); a float32 x takes fp32 products on the CUDA cores. int4 codes meet x in x's own type
    # (exact products). The CUDA-core form multiplies in fp32 whatever the types.
    narrow = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.uint8)
    precision = "ieee" if x.dtype not in narrow else "tf32" if q.dtype in narrow else "tf32x3"
    row_scaled_gemv_fwd_kernel[(n_o, splits)](
        rows,
        q,
        scale,
        zero,
        partials,
        y,
        counters,
        N,
        rows.stride(0),
        D=D,
        O=O,
        CHUNK=chunk,
        SPLITS=splits,
        BN=BLOCK_N,
        BO=BO,
        BD=BD,
        PRECISION=precision,
        SCALED=scale is not None and not int4,
        INT4=int4,
        GROUP=D // scale.shape[1] if int4 else 1,
        OP_DT=dot_operand_dtype(x.dtype) if int4 else tl.float32,
        CORES=cores,
        **pdl_launch(x),
        **extra,
    )
    return y.view(*x.shape[:-1], O)
