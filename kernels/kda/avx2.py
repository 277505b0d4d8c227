"""KDA on an AVX2 CPU, in C compiled at first use by kernels/native.py.

The decode step (decode_avx2.c): the short convolutions, the q and k norms, the gate, beta's sigmoid,
the recurrence and the gated output norm of a few tokens in one call, the convolution windows and the
recurrent state advanced in place. In PyTorch the same step is some fifty small operations a layer and
several passes over the state; engine/kda.py takes this call where `takes` allows and the PyTorch form
elsewhere (native.py says why).

The prefill (chunk_avx2.c): `short_conv`, the three short convolutions and their SiLU over every token
in one pass (engine/kda.py's short_conv is the PyTorch form), and `chunk_inputs`, the chunked form's
within-chunk matrices and the other inputs of its products, which kernels/kda/__init__.py's chunk_kda
passes to naive.py's chunk_kda_torch in place of its PyTorch form."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import float32_of, native

SOURCE = Path(__file__).with_name("decode_avx2.c")
MAX_HEAD_DIM = 256  # decode_avx2.c's buffers
MAX_CONV = 8

_P, _I = ctypes.c_void_p, ctypes.c_int


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        lib.kda_decode_step.argtypes = [*[_I] * 6, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, _P, _P, _I]
        lib.kda_decode_step.restype = _I
    return lib


# Activations and windows the step takes: float32, and bfloat16 (a model computing in bf16 on a CPU with
# bf16 hardware), read as they are; the kernel computes in float32 either way.
DTYPES = (torch.float32, torch.bfloat16)


def _layer_fits(x: torch.Tensor, recurrent: torch.Tensor, conv: torch.Tensor) -> bool:
    """float32 or bfloat16 activations and windows and a float32 state on the CPU, a head of at most
    MAX_HEAD_DIM in 8s, a convolution of 2 to MAX_CONV taps: what both C files take."""
    K, W = recurrent.shape[-1], conv.shape[-1] + 1
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and conv.dtype in DTYPES
        and recurrent.dtype == torch.float32
        and K <= MAX_HEAD_DIM
        and K % 8 == 0
        and 2 <= W <= MAX_CONV
        and recurrent.is_contiguous()
        and conv.is_contiguous()
    )


def takes(x: torch.Tensor, recurrent: torch.Tensor, conv: torch.Tensor) -> bool:
    """Whether the decode step runs for this layer's state (`_layer_fits`, decode_avx2.c built)."""
    return _layer_fits(x, recurrent, conv) and library() is not None


def conv_takes(x: torch.Tensor, recurrent: torch.Tensor, conv: torch.Tensor) -> bool:
    """Whether short_conv runs the prefill's convolutions for this layer (`_layer_fits`, chunk_avx2.c built)."""
    return _layer_fits(x, recurrent, conv) and chunk_library() is not None


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t [B, T, N] as evenly spaced rows of contiguous floats (a view where it already is), and their spacing."""
    B, T, _ = t.shape
    if t.stride(-1) != 1 or (B > 1 and t.stride(0) != T * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1)


def _floats(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous float32: itself when it is (parameters of a float32 model), else a kept copy."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else float32_of(t).contiguous()


class _Projections:
    """What both C calls take of the raw projections and the convolutions: whether everything is bfloat16
    (read and written as it is) or float32, the projections as rows (pointers and spacings), the weights'
    float32 taps, and the window the call advances (`conv` itself, or a float32 copy: `copy_back`)."""

    def __init__(self, projections, conv_weights, conv: torch.Tensor):
        self.bf16 = conv.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in projections)
        rows = [_rows(t if self.bf16 or t.dtype == torch.float32 else t.float()) for t in projections]
        self.conv = conv
        self.window = conv if self.bf16 or conv.dtype == torch.float32 else conv.float()  # takes(): contiguous
        self._kept = rows, [_floats(w) for w in conv_weights]
        self.inputs = (ctypes.c_void_p * len(rows))(*[t.data_ptr() for t, _ in rows])
        self.strides = (ctypes.c_long * len(rows))(*[stride for _, stride in rows])
        self.taps = (ctypes.c_void_p * 3)(*[t.data_ptr() for t in self._kept[1]])
        self.out_dtype = torch.bfloat16 if self.bf16 else torch.float32

    def copy_back(self) -> None:
        if self.window is not self.conv:
            self.conv.copy_(self.window)


def kda_decode_step(
    projections: tuple[torch.Tensor, ...],
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    recurrent: torch.Tensor,
) -> torch.Tensor:
    """The layer's output before o_proj, [B, T, H, K], from its raw projections (q, k, v before
    their convolutions, the forget gate's input, the output gate's input, each [B, T, H * K], and beta's
    logits [B, T, H]) and its parameters: the three convolution weights [H * K, 1, W], A_log (H
    elements), dt_bias [H * K] and the output norm's weight [K]. `conv` [B, 3, H * K, W - 1] and
    `recurrent` [B, H, K, K] advance in place. Projections and windows all bfloat16 are read and written
    as they are and the output is bfloat16 (rounded once); otherwise everything is taken as float32 and
    the output is float32."""
    B, H, K, _ = recurrent.shape
    T, W = projections[0].shape[1], conv.shape[-1] + 1
    given = _Projections(projections, conv_weights, conv)
    params = [_floats(p) for p in (A_log, dt_bias, norm_weight)]
    out = torch.empty(B, T, H, K, dtype=given.out_dtype)
    status = library().kda_decode_step(
        B,
        T,
        H,
        K,
        W,
        int(given.bf16),
        given.inputs,
        given.strides,
        given.taps,
        given.window.data_ptr(),
        *[p.data_ptr() for p in params],
        eps,
        recurrent.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    assert status == 0, "a head or convolution beyond decode_avx2.c's buffers"  # takes() keeps them within
    given.copy_back()
    return out


CHUNK_SOURCE = Path(__file__).with_name("chunk_avx2.c")
MAX_CHUNK = 64  # chunk_avx2.c's buffers


@functools.cache
def chunk_library() -> ctypes.CDLL | None:
    lib = native.library(CHUNK_SOURCE)
    if lib is not None:
        _L = ctypes.c_long
        lib.kda_chunk_inputs.argtypes = [*[_I] * 7, _P, _L, _P, _L, _P, _L, _P, _L, _P, _L, ctypes.c_float]
        lib.kda_chunk_inputs.argtypes += [*[_P] * 6, _I]
        lib.kda_chunk_inputs.restype = _I
        lib.kda_short_conv.argtypes = [_I, _I, ctypes.c_long, _I, _I, _P, _P, _P, _P, _P, _I]
        lib.kda_short_conv.restype = _I
    return lib


def chunk_takes(q: torch.Tensor) -> bool:
    """Whether chunk_inputs makes the chunked prefill's inputs for queries q [B, T, H, K]: on the CPU, K a
    multiple of 8 up to MAX_HEAD_DIM, the library built (naive.CHUNK_SIZE is within MAX_CHUNK)."""
    K = q.shape[-1]
    return q.device.type == "cpu" and K <= MAX_HEAD_DIM and K % 8 == 0 and chunk_library() is not None


def chunk_inputs(q, k, v, g, beta, scale: float, C: int):
    """kernels/kda/naive.py's `chunk_inputs_torch` in C (chunk_avx2.c): (A_qk, T, the right-hand side,
    K_g, Q exp(G), exp(G_C)) of every chunk, read from q, k [B, T, H, K] and v [B, T, H, V] (float32, or
    all bfloat16), g [B, T, H, K] and beta [B, T, H] (float32) as they are, rows evenly spaced."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    bf16 = all(t.dtype == torch.bfloat16 for t in (q, k, v))
    rows = [_rows((t if bf16 else t.float()).reshape(B, T, -1)) for t in (q, k, v)]
    g_rows, g_stride = _rows(g.float().reshape(B, T, -1))
    beta_rows, beta_stride = _rows(beta.float())
    X = -(-T // C) * B * H
    aqk, inverse = torch.empty(X, C, C), torch.empty(X, C, C)
    rhs, kg, qg, last = torch.empty(X, C, K + V), torch.empty(X, C, K), torch.empty(X, C, K), torch.empty(X, K)
    pointers = [arg for t, stride in rows for arg in (t.data_ptr(), stride)]
    status = chunk_library().kda_chunk_inputs(
        B,
        T,
        H,
        K,
        V,
        C,
        int(bf16),
        *pointers,
        g_rows.data_ptr(),
        g_stride,
        beta_rows.data_ptr(),
        beta_stride,
        scale,
        *[t.data_ptr() for t in (aqk, inverse, rhs, kg, qg, last)],
        torch.get_num_threads(),
    )
    if status == 2:
        raise MemoryError("no memory for the KDA prefill kernel's scratch")
    assert status == 0, "a chunk or head beyond chunk_avx2.c's buffers"  # chunk_takes() keeps them within
    return aqk, inverse, rhs, kg, qg, last


def short_conv(
    projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv: torch.Tensor,
) -> torch.Tensor:
    """engine/kda.py's short_conv of q, k and v side by side, in C: SiLU of the depthwise causal
    convolutions of the raw projections (each [B, T, P]) with their weights ([P, 1, W] each), the window
    `conv` [B, 3, P, W - 1] advanced in place; returns [B, T, 3 P], bfloat16 where the projections and
    the window all are (rounded once), else float32. `conv_takes` says where it runs."""
    B, T, P = projections[0].shape
    given = _Projections(projections, conv_weights, conv)
    out = torch.empty(B, T, 3 * P, dtype=given.out_dtype)
    status = chunk_library().kda_short_conv(
        B,
        T,
        P,
        conv.shape[-1] + 1,
        int(given.bf16),
        given.inputs,
        given.strides,
        given.taps,
        given.window.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    assert status == 0, "a convolution beyond chunk_avx2.c's buffers"  # takes() keeps them within
    given.copy_back()
    return out
