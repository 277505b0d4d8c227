"""Our int4 and int8 products for AVX2 CPUs (avx2.c, compiled at first use by kernels/native.py).

PyTorch's CPU int4 operator (kernels/quant/cpu.py) converts every weight to float before multiplying
and, on a CPU without AVX-512, runs at about a third of the memory's speed: one-token products, which
should be bound by reading the weights, are bound by arithmetic. avx2.c reads the operator's tiles
as they are and multiplies the 4-bit codes by the activations rounded to int8 in blocks of 32 (as
llama.cpp does), in integer multiply-adds: several times faster for a token, faster for prefill too.
The int8 rounding adds about 0.3% relative error to a product, against the ~10% that 4-bit weights
themselves carry. A decode step's routed experts go in one call (int4_experts_one_token: every chosen
expert's gate-up products, then their down products, in one parallel region), since at one token each
product is only a few microseconds of work a thread. int8 rows (a scale per output row) take the same
int8 activations for a few rows (int8_linear_avx2), where PyTorch's int8 operator multiplies in bf16.
On a CPU with AVX-512 VNNI (and VBMI) the int4 and int8 products take vpdpbusd instead, bit for bit the
AVX2 form's results: for int4 twice as fast for more than a few rows (reading, the experts of a chunk),
and for one row (decode) the codes of four inputs gathered per row by vpermb; for int8 two blocks of 32
inputs an instruction; `use_avx512_products` turns that off for the tests that compare the two.
Where the kernels cannot run (native.py), the operators do the work and `quantized_backend()` says why.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("avx2.c")
ACTIVATION_BLOCK = 32
GROUPS = (32, 64, 128)  # the int4 group sizes the kernel reads (kernels/quant/naive.py's INT4_GROUP_SIZES)
MAX_EXPERTS = 64  # the experts one *_experts_one_token call takes (avx2.c MAX_EXPERTS)

_POINTER, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here."""
    lib = native.library(SOURCE)
    if lib is not None:
        # x, its dtype flag, M, D, tiles, scales, tile rows, padded rows, group, y, its flag, out_features, threads
        lib.int4_linear.argtypes = [_POINTER, *[_INT] * 3, _POINTER, _POINTER, *[_INT] * 3, _POINTER, *[_INT] * 3]
        matrix = [_POINTER, _LONG, _POINTER, _LONG, _INT, _INT]  # tiles, their stride, scales, stride, group, rows
        lib.int4_experts_one_token.argtypes = [_POINTER, *[_INT] * 4, *matrix, *matrix, _POINTER, _POINTER]
        lib.int4_experts_one_token.argtypes += [_INT, _POINTER, _INT, _INT]
        # x, its flag, N, D, I, tile rows, the two matrices, G, the groups' experts and starts, the members'
        # tokens and weights, out, its flag, threads
        lib.int4_experts_grouped.argtypes = [_POINTER, *[_INT] * 5, *matrix, *matrix, _INT, *[_POINTER] * 5]
        lib.int4_experts_grouped.argtypes += [_INT, _INT]
        lib.int8_linear_avx2.argtypes = [_POINTER, _POINTER, _INT, _INT, _POINTER, _INT, _INT, _POINTER, _INT, _INT]
        lib.int8_dequantize_rows.argtypes = [_POINTER, _POINTER, _LONG, _LONG, _POINTER, _INT, _INT]
        lib.int8_experts_one_token.argtypes = [_POINTER, *[_INT] * 3, *[_POINTER] * 8, _INT, _POINTER, *[_INT] * 2]
        lib.use_avx512_products.argtypes = [_INT]
        # Each allocates its scratch and returns -1 when the allocation fails.
        for name in (
            "int4_linear",
            "int4_experts_one_token",
            "int4_experts_grouped",
            "int8_linear_avx2",
            "int8_experts_one_token",
        ):
            getattr(lib, name).restype = _INT
    return lib


def quantized_backend() -> str:
    """One line: which code multiplies int4 and int8 weights on this CPU, and why."""
    lib = library()
    if lib is not None:
        wide = ", AVX-512 VNNI" if lib.use_avx512_products(-1) else ""
        return f"int4 and int8 on the CPU: kimi-desk's AVX2 kernels{wide} (int8 activations)"
    return f"int4 and int8 on the CPU: PyTorch's operators ({native.reason(SOURCE)})"


def reads(rows: int, split: bool, group: int, in_features: int, padded_rows: int) -> bool:
    """Whether the kernel reads tiles of this layout and shape: split layouts of 32 or 64 rows, whole
    tiles, groups of 32-128 inputs."""
    return (
        split
        and rows in (32, 64)
        and padded_rows % rows == 0
        and group in GROUPS
        and in_features % group == 0
        and library() is not None
    )


def _activations(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as the kernels read it, float32 or bfloat16 rows one after another, and the dtype flag they take."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x.contiguous(), int(x.dtype == torch.bfloat16)


def int4_linear_avx2(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    rows: int,
    group: int,
    out_features: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M, D] @ W^T -> [M, out_features] (default: the tiles' padded rows O') in out_dtype (default x's;
    float32 or bfloat16), W in the CPU operator's tiles of `rows` rows with bf16 scales and zeros
    [D / group, O', 2], in one call: float32 and bfloat16 activations are read and written as they are."""
    assert tiles.dtype == torch.uint8 and scales_and_zeros.dtype == torch.bfloat16
    assert tiles.is_contiguous() and scales_and_zeros.is_contiguous()  # packed so by cpu.py
    x, x_bf16 = _activations(x)
    M, D = x.shape
    padded_rows = scales_and_zeros.shape[1]
    y = torch.empty(M, out_features or padded_rows, dtype=out_dtype or x.dtype)
    _allocated(
        library().int4_linear(
            x.data_ptr(),
            x_bf16,
            M,
            D,
            tiles.data_ptr(),
            scales_and_zeros.data_ptr(),
            rows,
            padded_rows,
            group,
            y.data_ptr(),
            int(y.dtype == torch.bfloat16),
            y.shape[1],
            torch.get_num_threads(),
        )
    )
    return y


def int4_experts_one_token(
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    gate_up,
    down,
    tile_rows: int,
    out_dtype: torch.dtype = torch.float32,
):
    """One token x [1, D] (float32 or bfloat16, read as it is; others as float32) through the stacked
    experts `rows` [k] (int64, < 0 skipped), mixed by weights [k]: [1, D] in out_dtype (float32 or
    bfloat16: the float32 sum rounded once), in one call (the gate-up products of every expert, then the
    down products, in one parallel region). gate_up and down: kernels/quant/cpu.py CpuInt4Stack, the
    joined w1-w3 matrix and w2."""
    x, x_bf16 = _activations(x)
    rows = rows.reshape(-1).to(torch.int64).contiguous()
    weights = weights.reshape(-1).to(torch.float32).contiguous()
    D, hidden = x.shape[-1], down.in_features
    out = torch.empty(1, D, dtype=out_dtype)

    _allocated(
        library().int4_experts_one_token(
            x.data_ptr(),
            x_bf16,
            D,
            hidden,
            tile_rows,
            *_matrix(gate_up),
            *_matrix(down),
            rows.data_ptr(),
            weights.data_ptr(),
            rows.numel(),
            out.data_ptr(),
            int(out_dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
    )
    return out


def int4_experts_grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up,
    down,
    tile_rows: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Tokens x [N, D] (float32 or bfloat16, read as they are) through their chosen stacked experts ids
    [N, k] (int64, < 0 skipped), mixed by weights [N, k]: [N, D] in out_dtype, in one call (avx2.c
    int4_experts_grouped: each token rounded to int8 once, the experts' products shared out over the
    threads in a few passes rather than a parallel region per expert). gate_up and down as for
    int4_experts_one_token."""
    x, x_bf16 = _activations(x)
    N, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    order = order[flat[order] >= 0]
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    starts = torch.zeros(len(experts) + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=starts[1:])
    tokens = (order // k).contiguous()
    member_weights = weights.reshape(-1)[order].to(torch.float32).contiguous()
    D, hidden = x.shape[-1], down.in_features
    out = torch.empty(N, D, dtype=out_dtype)
    _allocated(
        library().int4_experts_grouped(
            x.data_ptr(),
            x_bf16,
            N,
            D,
            hidden,
            tile_rows,
            *_matrix(gate_up),
            *_matrix(down),
            len(experts),
            experts.contiguous().data_ptr(),
            starts.data_ptr(),
            tokens.data_ptr(),
            member_weights.data_ptr(),
            out.data_ptr(),
            int(out_dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
    )
    return out


def _matrix(stack) -> tuple:
    """A CpuInt4Stack as the kernels take it: tiles, their stride, scales, their stride, group, rows."""
    return (
        stack.tiles.data_ptr(),
        stack.tiles.stride(0),
        stack.scales_and_zeros.data_ptr(),
        stack.scales_and_zeros.stride(0),
        stack.group,
        stack.scales_and_zeros.shape[-2],
    )


def int8_reads(out_features: int, in_features: int) -> bool:
    """Whether int8_linear_avx2 takes int8 rows of this shape (inputs in 32s)."""
    return in_features % ACTIVATION_BLOCK == 0 and library() is not None


def int8_linear_avx2(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, D] @ (Q s)^T -> [M, O] in x's dtype (float32 or bfloat16; others as float32) for int8 codes
    Q [O, D] and float32 row scales s [O], x rounded to int8 in blocks of 32 (avx2.c int8_linear_avx2):
    for a few rows."""
    x, x_bf16 = _activations(x)
    q, scale = q.contiguous(), scale.to(torch.float32).contiguous()
    M, D = x.shape
    y = torch.empty(M, q.shape[0], dtype=x.dtype)
    _allocated(
        library().int8_linear_avx2(
            q.data_ptr(),
            scale.data_ptr(),
            q.shape[0],
            D,
            x.data_ptr(),
            x_bf16,
            M,
            y.data_ptr(),
            x_bf16,
            torch.get_num_threads(),
        )
    )
    return y


def int8_dequantizes(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether int8_dequantize_rows takes these: int8 codes [..., O, D] on the CPU, contiguous, a float32
    scale per row, into float32 or bfloat16."""
    return (
        q.dtype == torch.int8
        and q.device.type == "cpu"
        and q.is_contiguous()
        and scale.dtype == torch.float32
        and scale.numel() * q.shape[-1] == q.numel()
        and dtype in (torch.float32, torch.bfloat16)
        and library() is not None
    )


def int8_dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """naive.py's dequantize_rows(q, scale, dtype), bit for bit, in one pass (int8_dequantizes must hold)."""
    out = torch.empty(q.shape, dtype=dtype)
    scale = scale.contiguous()
    library().int8_dequantize_rows(
        q.data_ptr(),
        scale.data_ptr(),
        scale.numel(),
        q.shape[-1],
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return out


def int8_experts_one_token(
    x: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    w1,
    w2,
    w3,
    s1,
    s2,
    s3,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """One token x [1, D] through the int8 experts `rows` [k] (int64, < 0 skipped) of stacks as stored
    (w1, w3 [E, I, D], w2 [E, D, I], row scales s1, s3 [E, I], s2 [E, D]), mixed by weights [k]: [1, D]
    in out_dtype (float32 or bfloat16) in one call (avx2.c int8_experts_one_token). None where the kernel does not take the shapes."""
    D, hidden = x.shape[-1], w1.shape[1]
    if not (
        x.shape[0] == 1
        and rows.numel() <= MAX_EXPERTS
        and int8_reads(hidden, D)
        and int8_reads(D, hidden)
        and hidden % 4 == 0  # avx2.c takes an expert's rows four at a time
        and D % 4 == 0
        and all(w.dtype == torch.int8 and w.is_contiguous() for w in (w1, w2, w3))
    ):
        return None
    x, x_bf16 = _activations(x)
    rows = rows.reshape(-1).to(torch.int64).contiguous()
    weights = weights.reshape(-1).to(torch.float32).contiguous()
    s1, s2, s3 = (s.to(torch.float32).contiguous() for s in (s1, s2, s3))
    out = torch.empty(1, D, dtype=out_dtype)
    _allocated(
        library().int8_experts_one_token(
            x.data_ptr(),
            x_bf16,
            D,
            hidden,
            *(t.data_ptr() for t in (w1, w3, w2, s1, s3, s2, rows, weights)),
            rows.numel(),
            out.data_ptr(),
            int(out_dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
    )
    return out


def _allocated(status: int) -> None:
    if status:
        raise MemoryError("out of memory for the CPU kernels' scratch buffers")
