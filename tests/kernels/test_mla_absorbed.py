"""The MLA pieces around the cached attention (kernels/mla/absorbed.py), run on CPU tensors through Triton's
interpreter, against float64 on fresh random inputs: the latents written into the cache at an int or a
device position, the absorbed queries and the heads' values; and the model's MLA layer through them
against its PyTorch form.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from kimi_desk.kernels.mla.absorbed import absorb_queries_triton, latents_into_triton, values_triton  # noqa: E402
from kimi_desk.kernels.norm.fused import rms_norm_triton  # noqa: E402
from kimi_desk.kernels.norm.naive import rms_norm_torch  # noqa: E402


def rel_err(a, b):
    assert not torch.isnan(a.float()).any(), "NaN in the output (an element the kernel never wrote?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("on_device", [False, True], ids=["int", "tensor"])
def test_latents_go_into_the_buffer_at_the_position(dtype, on_device):
    """[rms_norm(c) ‖ k_r] of a strided slice (the joined projection's output), written at rows start ..
    start + T of a longer buffer, bit for bit what the norm's own kernel and a concatenation give (the
    same latents whether a token was read in a prefill chunk or decoded), near float64; rows elsewhere
    untouched."""
    gen = torch.Generator().manual_seed(5 + on_device)
    B, T, L, R, eps = 2, 3, 64, 16, 1e-6
    joined = (torch.randn(B, T, 40 + L + R, generator=gen) * 3).to(dtype)
    ckv = joined[..., 40:]
    weight = (torch.rand(L, generator=gen) + 0.5).to(dtype)
    buffer = torch.full((B, 12, L + R), float("nan"), dtype=dtype)
    start = 4
    latents_into_triton(ckv, weight, eps, buffer, torch.tensor([start]) if on_device else start)
    got = buffer[:, start : start + T]
    assert torch.equal(got, torch.cat([rms_norm_triton(ckv[..., :L], weight, eps), ckv[..., L:]], dim=-1))
    exact = torch.cat([rms_norm_torch(ckv[..., :L].double(), weight.double(), eps), ckv[..., L:].double()], dim=-1)
    assert rel_err(got, exact) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert buffer[:, :start].isnan().all() and buffer[:, start + T :].isnan().all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_absorbed_queries_match_float64(out_dtype):
    """W_UK^T q_nope beside q_rope, W_UK read from kv_b_proj's weight as stored; q a strided slice."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, n, R, v, L = 2, 3, 4, 24, 16, 32, 96  # widths that are not powers of two, as a test config's
    wide = torch.randn(B, T, H * (n + R) + 24, generator=gen).bfloat16()
    q = wide[..., 24:].view(B, T, H, n + R)
    weight = (torch.randn(H * (n + v), L, generator=gen) * 0.1).bfloat16()
    got = absorb_queries_triton(q, weight, n, v, out_dtype)
    w_uk = weight.double().view(H, n + v, L)[:, :n]
    want = torch.cat([torch.einsum("bthn,hnl->bthl", q[..., :n].double(), w_uk), q[..., n:].double()], dim=-1)
    assert got.shape == (B, T, H, L + R) and got.dtype == out_dtype
    assert rel_err(got, want) < (1e-6 if out_dtype == torch.float32 else 8e-3)
    assert torch.equal(got[..., L:], q[..., n:].to(out_dtype))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_values_match_float64(out_dtype):
    gen = torch.Generator().manual_seed(12)
    B, T, H, n, v, L = 1, 2, 3, 32, 48, 160
    attended = torch.randn(B, T, H, L, generator=gen)
    weight = (torch.randn(H * (n + v), L, generator=gen) * 0.1).bfloat16()
    got = values_triton(attended, weight, n, v, out_dtype)
    want = torch.einsum("bthl,hvl->bthv", attended.double(), weight.double().view(H, n + v, L)[:, n:])
    assert got.shape == (B, T, H, v) and got.dtype == out_dtype
    assert rel_err(got, want) < (1e-6 if out_dtype == torch.float32 else 8e-3)


def test_mla_layer_through_the_kernels_matches_its_pytorch_form(monkeypatch):
    """The model's MLA layer reading a few tokens after a prefix, once through the Triton kernels
    (KIMI_DESK_KERNELS=triton: the fused latents, absorbed queries, attention and values) and once in
    PyTorch: the same outputs and the same cached latents."""
    from kimi_desk.bench.random_checkpoint import tiny_config
    from kimi_desk.engine.model import MultiHeadLatentAttention
    from kimi_desk.engine.state import MLACache

    config = tiny_config(hidden_size=64, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    torch.manual_seed(3)
    layer = MultiHeadLatentAttention(config).float()
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    x_prefix, x_new = torch.randn(1, 5, 64), torch.randn(1, 2, 64)
    outs, caches = [], []
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("KIMI_DESK_KERNELS", kernels)
        cache = MLACache(1, 128 + 16, torch.float32, "cpu", capacity=4)
        layer(x_prefix, cache)
        outs.append(layer(x_new, cache))
        caches.append(cache.latents.clone())
    assert rel_err(outs[1], outs[0]) < 1e-5
    assert rel_err(caches[1], caches[0]) < 1e-6
