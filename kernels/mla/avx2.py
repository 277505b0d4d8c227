"""MLA's decode attention over a float32 or bfloat16 cache on an AVX2 CPU (attention_avx2.c, compiled at first use
by kernels/native.py): each cached key read once, its scores and its share of the weighted sum taken
while it is in the core's caches, the softmax online. torch_attention.py's `mla_attention_cpu` asks it
for the cached keys and keeps PyTorch's products where it cannot run (native.py says why). Beside it, the
products around the attention on kv_b_proj's weight as stored, bfloat16 or float32 (`absorb_queries_avx2`,
`values_avx2`): PyTorch's form multiplies a float32 copy of a bfloat16 weight, twice the bytes a step
reads, and takes an einsum's dispatch each."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kimi_desk.kernels import native

SOURCE = Path(__file__).with_name("attention_avx2.c")
# The work a task takes at least, in multiply-adds (rows x (latent + value width) a key): fewer would cost
# more in starting and merging than they save. 512 keys of the demo model's one token (5 heads, 160-wide
# latents, 128-wide values), where this was measured; the 48B model's 32 heads of 576 + 512 do as much
# in 22 keys, so at 1k cached keys its step splits them 16 ways where a count of keys gave 2 parts (two
# busy threads of 16; BENCHMARKS-log.md).
MIN_WORK_PER_PART = 512 * 5 * (160 + 128)
# And keys a task takes at least: two of the kernel's blocks of 32.
MIN_KEYS_PER_PART = 64
# The rows a call takes (attention_avx2.c MAX_ROWS: two tokens of the 48B model's 32 heads); more (a
# question's tokens) go to MKL's products, which reach the cores' arithmetic with that many rows.
MAX_ROWS = 64

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library(SOURCE)
    if lib is not None:
        for function in (lib.mla_attend_cached, lib.mla_attend_cached_bf16):
            function.argtypes = [_P, _P, _L, _L, _I, _I, _I, _I, _P, _P, _P, _I]
        lib.mla_attend_new_token.argtypes = [_P, ctypes.c_float, _P, _I, _L, _P, _I, _I, _I, _L, _L, _P, _I]
        lib.mla_attend_new_token.restype = _I
        lib.mla_absorb_queries.argtypes = [_P, _P, _I, _I, _I, _I, _I, _I, _P, _I, _I]
        lib.mla_values.argtypes = [_P, _P, _I, _I, _I, _I, _I, _I, _P, _I]
    return lib


def takes(cache: torch.Tensor, value_dim: int, rows: int) -> bool:
    """Whether the kernel takes these rows and this cache: at most MAX_ROWS rows, float32 or bfloat16 on
    the CPU, its rows contiguous, latents in 8s and values in 64s."""
    D = cache.shape[-1]
    return (
        rows <= MAX_ROWS
        and cache.dtype in (torch.float32, torch.bfloat16)
        and cache.device.type == "cpu"
        and cache.stride(-1) == 1
        and D % 8 == 0
        and value_dim % 64 == 0
        and value_dim <= D
        and library() is not None
    )


def attend_cached(rows: torch.Tensor, cache: torch.Tensor, keys: int, value_dim: int):
    """rows [B, R, D] float32 (scaled queries) against cache[:, :keys] -> per part of the keys: maxima,
    sums [P, B, R] and partial weighted sums of the values [P, B, R, value_dim], each relative to its
    part's maximum (merged by the caller)."""
    B, R, D = rows.shape
    threads = torch.get_num_threads()
    parts = max(1, min(4 * threads, keys // MIN_KEYS_PER_PART, keys * R * (D + value_dim) // MIN_WORK_PER_PART))
    # Sequence-major, so that each sequence's parts are one contiguous block the C writes into.
    maxima = torch.empty(B, parts, R)
    sums = torch.empty(B, parts, R)
    partials = torch.empty(B, parts, R, value_dim)
    lib = library()
    attend = lib.mla_attend_cached if cache.dtype == torch.float32 else lib.mla_attend_cached_bf16
    for b in range(B):
        q = rows[b].contiguous()
        m, s, p = maxima[b], sums[b], partials[b]
        status = attend(
            q.data_ptr(),
            cache[b].data_ptr(),
            cache.stride(1),
            keys,
            D,
            value_dim,
            R,
            parts,
            m.data_ptr(),
            s.data_ptr(),
            p.data_ptr(),
            threads,
        )
        if status == -2:
            raise MemoryError("no memory for the MLA kernel's widened keys")
        assert status == 0, "rows beyond attention_avx2.c's"  # takes() keeps them to MAX_ROWS
    return maxima.transpose(0, 1), sums.transpose(0, 1), partials.transpose(0, 1)


def attend_new_token(
    queries: torch.Tensor, scale: float, cache: torch.Tensor, cached: int | torch.Tensor, value_dim: int
):
    """A decode step's queries [B, R, D] float32 (its one token's heads, whose latents are written at row
    `cached`), times `scale`, against cache[:, : cached + 1] -> the attended latents [B, R, value_dim]
    float32, in one call a sequence (the keys' parts split and merged in C). `cached` may be a one-element
    int64 tensor on the CPU, read by the kernel when it runs: a recorded step then follows the cache."""
    rows = queries.float()
    B, R, D = rows.shape
    out = torch.empty(B, R, value_dim)
    where = native.count_at(cached)
    for b in range(B):
        status = library().mla_attend_new_token(
            rows[b].contiguous().data_ptr(),
            scale,
            cache[b].data_ptr(),
            int(cache.dtype == torch.bfloat16),
            cache.stride(1),
            where,
            D,
            value_dim,
            R,
            MIN_WORK_PER_PART,
            MIN_KEYS_PER_PART,
            out[b].data_ptr(),
            torch.get_num_threads(),
        )
        if status == -2:
            raise MemoryError("no memory for the MLA kernel's scratch")
        assert status == 0, "rows beyond attention_avx2.c's"  # takes() keeps them to MAX_ROWS
    return out


def reads_weight(kv_b_weight: torch.Tensor, value_dim: int) -> bool:
    """Whether absorb_queries_avx2 and values_avx2 take kv_b_proj's weight [H * (n + v), L]: bfloat16 or
    float32 on the CPU, contiguous, L in 64s and v in 4s."""
    return (
        kv_b_weight.dtype in (torch.bfloat16, torch.float32)
        and kv_b_weight.device.type == "cpu"
        and kv_b_weight.is_contiguous()
        and kv_b_weight.shape[1] % 64 == 0
        and value_dim % 4 == 0
        and library() is not None
    )


def _on_weight(function, rows: torch.Tensor, kv_b_weight: torch.Tensor, nope_dim: int, v_dim: int, out, *more) -> int:
    """One of the two products on kv_b_proj's weight: rows [B, T, H, width] float32, contiguous."""
    B, T, H, _ = rows.shape
    return function(
        rows.data_ptr(),
        kv_b_weight.data_ptr(),
        int(kv_b_weight.dtype == torch.bfloat16),
        B * T,
        H,
        nope_dim,
        v_dim,
        kv_b_weight.shape[1],
        out.data_ptr(),
        *more,
        torch.get_num_threads(),
    )


def absorb_queries_avx2(q: torch.Tensor, kv_b_weight: torch.Tensor, nope_dim: int, v_dim: int) -> torch.Tensor:
    """q [B, T, H, n + R] -> the decode form's queries [W_UK^T q_nope ‖ q_rope] [B, T, H, L + R] in
    float32 (reads_weight must hold): the product written by the kernel, the rope part copied beside it."""
    B, T, H, width = q.shape
    L = kv_b_weight.shape[1]
    q_nope = q[..., :nope_dim].float().contiguous()
    out = torch.empty(B, T, H, L + width - nope_dim)
    status = _on_weight(library().mla_absorb_queries, q_nope, kv_b_weight, nope_dim, v_dim, out, out.shape[-1])
    assert status == 0, "a latent width beyond attention_avx2.c's"  # reads_weight keeps it to 64s
    out[..., L:] = q[..., nope_dim:]
    return out


def values_avx2(attended: torch.Tensor, kv_b_weight: torch.Tensor, nope_dim: int, v_dim: int) -> torch.Tensor:
    """attended [B, T, H, L] -> W_UV attended [B, T, H, v] in float32 (reads_weight must hold)."""
    B, T, H, L = attended.shape
    a = attended.float().contiguous()
    out = torch.empty(B, T, H, v_dim)
    status = _on_weight(library().mla_values, a, kv_b_weight, nope_dim, v_dim, out)
    assert status == 0, "a width beyond attention_avx2.c's"  # reads_weight keeps them to 64s and 4s
    return out
