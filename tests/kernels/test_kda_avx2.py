"""KDA's AVX2 decode step (kernels/kda/avx2.py, decode_avx2.c) against float64 math on fresh random inputs:
the convolutions, norms, gate and beta written out here, fla-core's naive recurrence, the gated norm; the
output, the advanced state and the advanced windows. Then the layer: engine/kda.py takes the C step on
an AVX2 CPU and gives what its PyTorch form gives."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.naive import naive_recurrent_kda
from kda_cases import rel_err
from test_quant_avx2 import can_build

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.kda import KimiDeltaAttention
from kimi_desk.kernels.kda import avx2


def test_kernel_builds_where_it_can():
    assert (avx2.library() is not None) == can_build(), avx2.native.reason(avx2.SOURCE)


def reference(projections, conv_weights, window, A_log, dt_bias, norm_weight, eps, state):
    """(out [B, T, H, K], state, window) in float64, the spec's formulas one by one."""
    q_in, k_in, v_in, f, gate, b = (t.double() for t in projections)
    B, T, P = q_in.shape
    H, K = state.shape[1], state.shape[-1]
    W = window.shape[-1] + 1
    convolved = []
    for n, x in enumerate((q_in, k_in, v_in)):
        full = torch.cat([window[:, n].double(), x.transpose(1, 2)], dim=-1)  # [B, P, W - 1 + T]
        taps = conv_weights[n].double().view(P, W)
        y = torch.stack([(full[..., t : t + W] * taps).sum(-1) for t in range(T)], dim=1)  # [B, T, P]
        convolved.append(F.silu(y).view(B, T, H, K))
        window[:, n] = full[..., T:].to(window.dtype)
    q, k, v = convolved
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    g = -A_log.double().view(H, 1).exp() * F.softplus(f.view(B, T, H, K) + dt_bias.double().view(H, K), threshold=20)
    o, final = naive_recurrent_kda(q, k, v, g, b.sigmoid(), initial_state=state.double(), output_final_state=True)
    o = o / (o.square().mean(-1, keepdim=True) + eps).sqrt() * norm_weight.double() * gate.view(B, T, H, K).sigmoid()
    return o, final, window


def inputs(B, T, H, K, W, gate_scale, joined, seed):
    """Fresh random projections (views of one joined product when `joined`, as the fused layer gives them),
    parameters and a non-zero state and window."""
    g = torch.Generator().manual_seed(seed)
    P = H * K
    sizes = [P, P, P, P, P, H]
    if joined:
        projections = torch.randn(B, T, sum(sizes), generator=g).split(sizes, dim=-1)
    else:
        projections = [torch.randn(B, T, n, generator=g) for n in sizes]
    projections = list(projections)
    projections[3] = projections[3] * gate_scale  # the forget gate's input: softplus beyond 20 too
    conv_weights = [torch.randn(P, 1, W, generator=g) * 0.5 for _ in range(3)]
    window = torch.randn(B, 3, P, W - 1, generator=g)
    A_log = torch.randn(H, generator=g)
    dt_bias = torch.randn(P, generator=g)
    norm_weight = torch.rand(K, generator=g) + 0.5
    state = torch.randn(B, H, K, K, generator=g) * 0.1
    return tuple(projections), conv_weights, window, A_log, dt_bias, norm_weight, 1e-5, state


@pytest.mark.parametrize(
    "B,T,H,K,W,gate_scale,joined",
    [
        (1, 1, 5, 64, 4, 1.0, True),
        (1, 1, 4, 128, 4, 10.0, True),
        (2, 3, 3, 64, 4, 30.0, False),
        (1, 16, 2, 32, 2, 1.0, True),
        (2, 1, 2, 256, 8, 3.0, False),
    ],
    ids=lambda x: str(x),
)
def test_step_matches_float64(B, T, H, K, W, gate_scale, joined):
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    projections, conv_weights, window, A_log, dt_bias, norm_weight, eps, state = inputs(
        B, T, H, K, W, gate_scale, joined, seed=B * 1000 + T * 100 + K
    )
    want, want_state, want_window = reference(
        projections, conv_weights, window.clone().double(), A_log, dt_bias, norm_weight, eps, state
    )
    assert avx2.takes(projections[0], state, window)
    got = avx2.kda_decode_step(projections, conv_weights, window, A_log, dt_bias, norm_weight, eps, state)
    assert rel_err(got, want) < 2e-6
    assert rel_err(state, want_state) < 2e-6  # advanced in place
    assert torch.equal(window, want_window.float())


def test_bfloat16_activations_and_windows_are_read_as_they_are():
    """A model computing in bf16 (CPUs with bf16 hardware): the kernel reads the bf16 projections and
    windows as the float32 they widen to, so its float32 sums and state are those of the float32 call on
    the widened values, exactly, and its bf16 output is that call's output rounded once; the windows
    come back in bf16, exactly."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    projections, conv_weights, window, A_log, dt_bias, norm_weight, eps, state = inputs(1, 2, 4, 64, 4, 3.0, True, 11)
    projections = tuple(t.bfloat16() for t in projections)
    window = window.bfloat16()
    want, want_state, want_window = reference(
        projections, conv_weights, window.double(), A_log, dt_bias, norm_weight, eps, state
    )
    widened_window, widened_state = window.float(), state.clone()
    widened = avx2.kda_decode_step(
        tuple(t.float() for t in projections),
        conv_weights,
        widened_window,
        A_log,
        dt_bias,
        norm_weight,
        eps,
        widened_state,
    )
    assert avx2.takes(projections[0], state, window)
    got = avx2.kda_decode_step(projections, conv_weights, window, A_log, dt_bias, norm_weight, eps, state)
    assert got.dtype == torch.bfloat16 and torch.equal(got, widened.bfloat16())
    assert rel_err(widened, want) < 2e-6 and rel_err(got, want) < 8e-3
    assert torch.equal(state, widened_state) and rel_err(state, want_state) < 2e-6
    assert window.dtype == torch.bfloat16 and torch.equal(window, want_window.bfloat16())


def test_other_dtypes_and_sizes_keep_pytorch():
    state, window = torch.zeros(1, 2, 64, 64), torch.zeros(1, 3, 128, 3)
    assert not avx2.takes(torch.zeros(1, 1, 8, dtype=torch.float16), state, window)
    assert not avx2.takes(torch.zeros(1, 1, 8), state.double(), window)
    assert not avx2.takes(torch.zeros(1, 1, 8), torch.zeros(1, 1, 512, 512), torch.zeros(1, 3, 512, 3))
    assert not avx2.takes(torch.zeros(1, 1, 8), state, torch.zeros(1, 3, 128, 8))
    assert not avx2.takes(torch.zeros(1, 1, 8), torch.zeros(1, 2, 20, 20), torch.zeros(1, 3, 40, 3))


def random_layer(seed: int) -> KimiDeltaAttention:
    config = KimiLinearConfig(
        hidden_size=96, kda_num_heads=3, kda_head_dim=32, num_hidden_layers=1, vocab_size=16, short_conv_kernel_size=4
    )
    torch.manual_seed(seed)
    layer = KimiDeltaAttention(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


def both_ways(monkeypatch, layer, pieces, counted: str, pytorch_form: tuple):
    """The layer fed `pieces` in turn from a fresh float32 state, as it runs on this CPU and with avx2's
    `pytorch_form` (a name and its replacement) patched in: ((outputs, state, calls of avx2.`counted`),
    the same for the PyTorch form)."""
    runs = []
    for patch in (None, pytorch_form):
        if patch is not None:
            monkeypatch.setattr(avx2, *patch)
        calls, kernel = [], getattr(avx2, counted)
        monkeypatch.setattr(avx2, counted, lambda *a, _k=kernel: calls.append(1) or _k(*a))
        state = layer.new_state(1, torch.float32, "cpu")
        with torch.no_grad():
            outputs = [layer(piece, state) for piece in pieces]
        runs.append((outputs, state, len(calls)))
        monkeypatch.setattr(avx2, counted, kernel)
    return runs


def test_layer_takes_the_step_and_equals_its_pytorch_form(monkeypatch):
    """A KDA layer's decode steps on this CPU: the C step where it runs, and the same outputs, state and
    windows as the layer's PyTorch form."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    x = torch.randn(1, 5, 96)
    pieces = [x[:, t : t + 1] for t in range(5)] + [x[:, :3]]
    (c_out, c_state, c_calls), (t_out, t_state, t_calls) = both_ways(
        monkeypatch, random_layer(7), pieces, "kda_decode_step", ("takes", lambda *_: False)
    )
    assert (c_calls, t_calls) == (6, 0)
    for got, want in zip(c_out, t_out):
        assert rel_err(got, want) < 1e-5
    assert rel_err(c_state.recurrent, t_state.recurrent) < 1e-5
    assert rel_err(c_state.conv, t_state.conv) < 1e-6


def test_a_bf16_layer_takes_the_step_and_is_nearer_float32_than_its_pytorch_form(monkeypatch):
    """The layer computing in bf16: the C step (float32 inside) against the layer's PyTorch form in bf16,
    both measured against the same layer in float32: the step is at least as near, and the windows it
    leaves are the PyTorch form's, bit for bit."""
    if avx2.library() is None:
        pytest.skip(avx2.native.reason(avx2.SOURCE))
    from kimi_desk.engine.weights import FP32_PARAMETERS

    config = KimiLinearConfig(
        hidden_size=96, kda_num_heads=3, kda_head_dim=32, num_hidden_layers=1, vocab_size=16, short_conv_kernel_size=4
    )
    torch.manual_seed(8)
    layer = KimiDeltaAttention(config)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p).mul_(0.3).bfloat16().float())
    x = torch.randn(1, 6, 96).bfloat16()

    def run(dtype, takes):
        monkeypatch.setattr(avx2, "takes", takes)
        model = KimiDeltaAttention(config)
        model.load_state_dict(layer.state_dict())
        for name, p in model.named_parameters():
            if not name.endswith(FP32_PARAMETERS):
                p.data = p.data.to(dtype)
        state = model.new_state(1, dtype, "cpu")
        with torch.no_grad():
            out = torch.cat([model(x[:, t : t + 1].to(dtype), state) for t in range(6)], dim=1)
        return out.float(), state

    taken, step, calls = avx2.takes, avx2.kda_decode_step, []
    monkeypatch.setattr(avx2, "kda_decode_step", lambda *a: calls.append(1) or step(*a))
    exact, _ = run(torch.float32, lambda *_: False)
    c_out, c_state = run(torch.bfloat16, taken)
    assert len(calls) == 6
    t_out, t_state = run(torch.bfloat16, lambda *_: False)
    assert c_state.conv.dtype == torch.bfloat16 and torch.equal(c_state.conv, t_state.conv)
    assert rel_err(c_out, exact) <= rel_err(t_out, exact) * 1.1 and rel_err(c_out, exact) < 2e-2


def test_prefill_kernels_build_where_they_can():
    assert (avx2.chunk_library() is not None) == can_build(), avx2.native.reason(avx2.CHUNK_SOURCE)


def blocks_f64(qk, bc, G):
    """Each chunk's A_qk (lower triangle with its diagonal) and T = (I + strictly_lower(beta A_kk))^-1 in
    float64, straight from their definitions: every pair's decay exp(G_i - G_j) formed whole."""
    q, k = qk[:, :, 0].double(), qk[:, :, 1].double()
    lower = torch.ones(G.shape[1], G.shape[1], dtype=torch.bool).tril()
    difference = G.unsqueeze(2) - G.unsqueeze(1)  # [X, C, C, K]: G_i - G_j
    decay = difference.where(lower[..., None], -torch.inf).exp()  # j > i: none
    aqk = torch.einsum("xid,xjd,xijd->xij", q, k, decay)
    akk = torch.einsum("xid,xjd,xijd->xij", k, k, decay).tril(-1) * bc.double()
    eye = torch.eye(G.shape[1], dtype=torch.float64)
    return aqk, torch.linalg.inv(eye + akk)


def inputs_f64(q, k, v, g, beta, scale, C):
    """chunk_inputs' six tensors in float64 from their definitions (kernels/kda/naive.py's
    chunk_inputs_torch says what each is), chunks ordered chunk-major, then sequence, then head."""
    B, T, H, K = q.shape
    N = -(-T // C)

    def chunked(x):  # [B, T, H, D] -> [N * B * H, C, D], zeros past T
        x = F.pad(x.double(), (0, 0, 0, 0, 0, N * C - T))
        return x.view(B, N, C, H, -1).permute(1, 0, 3, 2, 4).reshape(N * B * H, C, -1)

    qs, ks, vs, bc = chunked(q) * scale, chunked(k), chunked(v), chunked(beta.unsqueeze(-1))
    G = chunked(g).cumsum(1)
    aqk, inverse = blocks_f64(torch.stack([qs, ks], dim=2), bc, G)
    rhs = torch.cat([G.exp() * ks, vs], dim=-1) * bc
    return aqk, inverse, rhs, ks * (G[:, -1:] - G).exp(), qs * G.exp(), G[:, -1].exp()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,T,H,K,V,min_log_decay",
    [
        (1, 64, 3, 128, 128, -0.05),
        (2, 100, 2, 64, 32, -5.0),
        (1, 70, 2, 16, 16, -50.0),
        (1, 130, 1, 256, 64, -2.0),
        (2, 20, 2, 32, 48, -1.0),
    ],
)
def test_chunk_inputs_match_float64(dtype, B, T, H, K, V, min_log_decay):
    """The C inputs (chunks of 64 tokens, the last one padded; A_qk and T by halving) against every tensor
    formed from its definition in float64, on gates from gentle to fifty per step; the inputs read as
    they are, views of one joined tensor."""
    if avx2.chunk_library() is None:
        pytest.skip(avx2.native.reason(avx2.CHUNK_SOURCE))
    from kda_cases import make_inputs

    q, k, v, g, beta, _ = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T * 3 + K)
    joined = torch.cat([q, k], dim=-1)  # q and k as strided views
    q, k = joined[..., :K], joined[..., K:]
    got = avx2.chunk_inputs(q, k, v, g, beta, K**-0.5, 64)
    want = inputs_f64(q, k, v, g, beta, K**-0.5, 64)
    for name, a, b in zip(("aqk", "inverse", "rhs", "kg", "qg", "last"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        # Decays below float32's smallest normal (a chunk of steps of -50) are zeros on both sides.
        assert (a.double() - b).norm() <= 1e-5 * b.norm() + 1e-37, name
    assert torch.equal(got[0].triu(1), torch.zeros_like(got[0])) and torch.equal(
        got[1].triu(1), torch.zeros_like(got[1])
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,T,H,K,V,min_log_decay", [(1, 65, 3, 64, 32, -50.0), (2, 200, 2, 32, 32, -3.0), (1, 300, 2, 128, 128, -0.05)]
)
def test_chunked_prefill_with_c_inputs_matches_fla_naive(monkeypatch, dtype, B, T, H, K, V, min_log_decay):
    """kernels.kda.chunk_kda on this CPU makes its chunks' inputs in C; the prefill's output and final
    state against fla-core's naive recurrence in float64."""
    if avx2.chunk_library() is None:
        pytest.skip(avx2.native.reason(avx2.CHUNK_SOURCE))
    from kda_cases import make_inputs
    from test_kda_torch import TOLERANCE, reference

    from kimi_desk.kernels.kda import chunk_kda

    calls = []
    inputs = avx2.chunk_inputs
    monkeypatch.setattr(avx2, "chunk_inputs", lambda *a: calls.append(1) or inputs(*a))
    q, k, v, g, beta, state = make_inputs(B, T, H, K, V, min_log_decay, dtype, seed=T + K)
    want, want_state = reference(q, k, v, g, beta, state)
    got, got_state = chunk_kda(q, k, v, g, beta, initial_state=state, output_final_state=True)
    assert calls == [1]
    assert rel_err(got, want) < TOLERANCE[dtype] and rel_err(got_state, want_state) < TOLERANCE[dtype]


def conv_f64(projections, conv_weights, window):
    """SiLU of each depthwise causal convolution in float64, q's, k's and v's channels side by side, and
    the window's last W - 1 inputs."""
    W = window.shape[-1] + 1
    outputs, windows = [], []
    for n, x in enumerate(projections):
        full = torch.cat([window[:, n].double(), x.double().transpose(1, 2)], dim=-1)  # [B, P, W - 1 + T]
        taps = conv_weights[n].double().view(-1, W)
        y = torch.stack([(full[..., t : t + W] * taps).sum(-1) for t in range(x.shape[1])], dim=1)
        outputs.append(F.silu(y))
        windows.append(full[..., full.shape[-1] - (W - 1) :])
    return torch.cat(outputs, dim=-1), torch.stack(windows, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,P,W", [(1, 200, 320, 4), (2, 37, 136, 4), (1, 3, 64, 2), (1, 70, 512, 8)])
def test_prefill_convolutions_match_float64(dtype, B, T, P, W):
    """The prefill's three convolutions in C against float64, with a non-zero window: the outputs within
    the dtype's rounding, the advanced window exact (it holds inputs)."""
    if avx2.chunk_library() is None:
        pytest.skip(avx2.native.reason(avx2.CHUNK_SOURCE))
    g = torch.Generator().manual_seed(B * 1000 + T + P)
    projections = torch.randn(B, T, 3 * P, generator=g).to(dtype).split(P, dim=-1)  # views of one product
    conv_weights = [torch.randn(P, 1, W, generator=g) * 0.5 for _ in range(3)]
    window = torch.randn(B, 3, P, W - 1, generator=g).to(dtype)
    want, want_window = conv_f64(projections, conv_weights, window)
    got = avx2.short_conv(projections, conv_weights, window)
    assert got.dtype == dtype and got.shape == (B, T, 3 * P)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert torch.equal(window, want_window.to(dtype))


def test_a_layer_prefill_takes_the_c_convolutions_and_equals_its_pytorch_form(monkeypatch):
    """A KDA layer reading 150 tokens after 40 on this CPU: the C convolutions (and blocks) where they run,
    and the outputs, state and windows of the layer's PyTorch form."""
    if avx2.chunk_library() is None:
        pytest.skip(avx2.native.reason(avx2.CHUNK_SOURCE))
    x = torch.randn(1, 190, 96)
    (c_out, c_state, c_calls), (t_out, t_state, t_calls) = both_ways(
        monkeypatch, random_layer(9), [x[:, :40], x[:, 40:]], "short_conv", ("chunk_library", lambda: None)
    )
    assert (c_calls, t_calls) == (2, 0)
    for got, want in zip(c_out, t_out):
        assert rel_err(got, want) < 1e-5
    assert rel_err(c_state.recurrent, t_state.recurrent) < 1e-5
    assert torch.equal(c_state.conv, t_state.conv)
