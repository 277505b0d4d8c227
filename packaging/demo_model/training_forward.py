"""A differentiable forward for training, over the engine's own modules and parameters.

`KimiLinearForCausalLM.forward` runs under `torch.inference_mode()` and its kernels write into
preallocated buffers (the chunked KDA's in-place decays, the MLA prefill's online-softmax
accumulators), so autograd cannot go through it. Training walks the same modules here instead:

* the parameters are the engine modules' own; projections and embeddings run through their nn.Linear
  and nn.Embedding; norms, convolutions, the router and the experts are the engine's formulas written
  out below (the engine's own forwards may take inference-only kernels on CUDA);
* KDA's recurrence goes through `chunk_kda_autograd` (below): a chunked form written without in-place
  updates, from a zero state (tests check it against the engine's chunk_kda_torch and the recurrence);
  or through fla's Triton `chunk_kda` (forward and backward kernels) when it is installed and agrees
  with it (`select_kda_function`);
* MLA attends with `scaled_dot_product_attention` over keys and values expanded from the latents,
  the same function as the engine's prefill (NoPE, causal, scale (n + r) ** -0.5).

Every sequence starts from an empty state, as a document does when kimi-desk reads it.
tests/packaging/test_demo_model.py checks that `training_logits` equals `model(ids, model.new_state(1))`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kimi_desk.engine.model import KimiLinearForCausalLM

CHUNK_SIZE = 64


def chunk_kda_autograd(q, k, v, g, beta, scale=None, chunk_size=CHUNK_SIZE, sub_chunk_size=8):
    """KDA from a zero state, differentiable: q, k [B, T, H, K] (L2-normalised), v [B, T, H, V],
    g [B, T, H, K] log decay (<= 0, unbounded below), beta [B, T, H] -> o [B, T, H, V] float32.

    The chunked form (kimi-linear-spec.md §3.3): per chunk of C tokens, with G = cumsum(g),
    Aqk[i, j] = q_i . (k_j exp(G_i - G_j)) for j <= i and Akk the same with k_i for j < i, times beta_i;
    then W, U = (I + Akk)^-1 [beta exp(G) K, beta V] and a scan over the chunks carrying the state. A
    decay exp(G_i - G_j) is never formed as exp(G_i) exp(-G_j), which overflows: inside a sub-chunk
    it comes from the difference itself, across sub-chunks it factors through the sub-chunk's first
    row r as exp(G_i - G_r) exp(G_r - G_j), two factors <= 1. Cumulative sums are taken in float64 (G
    reaches -50 C), and all of it runs in fp32 whatever autocast says.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, S = chunk_size, sub_chunk_size
    assert C % S == 0
    scale = K**-0.5 if scale is None else scale
    N = (T + C - 1) // C
    pad = N * C - T
    num_sub = C // S
    device = q.device

    def chunked(x):  # [B, T, H, D] -> [B, H, N, C, D] float32; zero padding is inert (g = 0, beta = 0)
        x = x.float().transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, H, N, C, x.shape[-1])

    with torch.autocast(device_type=device.type, enabled=False):
        qc = chunked(q) * scale
        kc, vc = chunked(k), chunked(v)
        bc = chunked(beta.unsqueeze(-1))  # [B, H, N, C, 1]
        G = chunked(g).double().cumsum(-2)  # [B, H, N, C, K] float64

        # Diagonal sub-blocks: pairwise decays from sums local to the sub-chunk (fp32 suffices over S steps).
        Gs = G.view(B, H, N, num_sub, S, K)
        G_local = (Gs - Gs[..., :1, :]).float()
        diff = G_local.unsqueeze(-2) - G_local.unsqueeze(-3)  # [B, H, N, nS, S_i, S_j, K]
        lower = torch.ones(S, S, dtype=torch.bool, device=device).tril()
        # Above the diagonal the difference is positive: -inf there makes its factor exactly 0 with a
        # zero gradient, where clamping and masking afterwards would still form exp of it.
        decay = torch.where(lower[:, :, None], diff, float("-inf")).exp()
        qs, ks = qc.view(B, H, N, num_sub, S, K), kc.view(B, H, N, num_sub, S, K)
        kd = decay * ks.unsqueeze(-3)  # k_j exp(G_i - G_j)
        aqk_diag = (qs.unsqueeze(-2) * kd).sum(-1)  # [B, H, N, nS, S, S], j <= i
        akk_diag = (ks.unsqueeze(-2) * kd).sum(-1).tril(-1)  # j < i

        # Earlier sub-chunks, through the reference r = the first row of each sub-chunk.
        G_ref = Gs[..., :1, :]  # [B, H, N, nS, 1, K]
        to_ref = (Gs - G_ref).float().exp()  # exp(G_i - G_r), i >= r: [B, H, N, nS, S, K]
        columns = torch.arange(C, device=device)
        before_ref = columns[None, :] < (torch.arange(num_sub, device=device) * S)[:, None]  # [nS, C]
        from_ref = (G_ref - G.unsqueeze(3)).float()  # G_r - G_j: [B, H, N, nS, C, K]
        from_ref = torch.where(before_ref[:, :, None], from_ref, float("-inf")).exp() * kc.unsqueeze(3)
        aqk_off = (qs * to_ref) @ from_ref.transpose(-1, -2)  # [B, H, N, nS, S, C]
        akk_off = (ks * to_ref) @ from_ref.transpose(-1, -2)

        eye_sub = torch.eye(num_sub, dtype=torch.float32, device=device)
        aqk = aqk_off.reshape(B, H, N, C, C) + torch.einsum("bhnaij,ac->bhnaicj", aqk_diag, eye_sub).reshape(
            B, H, N, C, C
        )
        akk = akk_off.reshape(B, H, N, C, C) + torch.einsum("bhnaij,ac->bhnaicj", akk_diag, eye_sub).reshape(
            B, H, N, C, C
        )
        akk = akk * bc

        # (I + Akk) is unit lower-triangular: W = T (beta exp(G) K), U = T (beta V) by substitution.
        decay_from_start = G.float().exp()  # exp(G_i) <= 1
        eye = torch.eye(C, dtype=torch.float32, device=device)
        rhs = torch.cat([bc * decay_from_start * kc, bc * vc], dim=-1)
        wu = torch.linalg.solve_triangular(eye + akk, rhs, upper=False, unitriangular=True)
        w, u = wu[..., :K], wu[..., K:]

        qg = qc * decay_from_start  # [B, H, N, C, K]
        kg = kc * (G[..., -1:, :] - G).float().exp()  # k_i exp(G_last - G_i)
        decay_last = decay_from_start[..., -1, :].unsqueeze(-1)  # [B, H, N, K, 1]
        state = torch.zeros(B, H, K, V, dtype=torch.float32, device=device)
        # Per-chunk views taken once with unbind: indexing chunk n inside the loop would make each
        # index's backward write a zero tensor of the whole input, N times over.
        u_, w_, qg_, aqk_, kg_, decay_ = (t.unbind(2) for t in (u, w, qg, aqk, kg.transpose(-1, -2), decay_last))
        outputs = []
        for n in range(N):
            v_new = u_[n] - w_[n] @ state  # [B, H, C, V]
            outputs.append(qg_[n] @ state + aqk_[n] @ v_new)
            state = decay_[n] * state + kg_[n] @ v_new
        o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o


def pin_triton_autotune() -> int:
    """Make every Triton autotuner created from now on hold one config, so that it compiles that one
    and benchmarks none; returns how many autotuners were pinned so far (patched once per process).

    Why: on the first H100 run, 7 of 17 minutes went to compiling and benchmarking every config of
    fla's KDA kernels (forward and backward, 6-18 configs each), once for the start-up check's head
    count and again for the model's, and again for each new batch size (cumsum kernels key on B).
    This model is launch-bound (matrices of width 320), so the best config buys little. The one kept:
    4 warps where offered, then the fewest pipeline stages (the least shared memory, so it fits any
    card), then the first listed (fla lists its smaller blocks first)."""
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "_demo_pinned", None) is not None:
        return autotuner.Autotuner._demo_pinned[0]
    original = autotuner.Autotuner.__init__
    pinned = [0]

    def pick(configs):
        ranked = sorted(range(len(configs)), key=lambda i: (abs(configs[i].num_warps - 4), configs[i].num_stages, i))
        return [configs[ranked[0]]]

    def init(self, fn, arg_names, configs, *args, **kwargs):
        if len(configs) > 1:
            configs = pick(list(configs))
            pinned[0] += 1
            # A pruner could drop the one config left.
            kwargs["prune_configs_by"] = None
        original(self, fn, arg_names, configs, *args, **kwargs)

    autotuner.Autotuner.__init__ = init
    autotuner.Autotuner._demo_pinned = pinned
    return pinned[0]


def fla_chunk_kda_function(pin_configs: bool = True):
    """fla's Triton chunk_kda (differentiable) as a function of this module's signature, or None.

    A batch [B, T] goes to fla as one varlen sequence [1, B * T] with `cu_seqlens` at every T: each
    row still starts from an empty state, and the kernels see the same shape for every batch of the
    same size (training keeps B * T fixed), so nothing is compiled or autotuned again when the
    context length changes. `pin_configs` pins fla's autotuners to one config each (must run
    before fla is first imported)."""
    if pin_configs:
        try:
            pin_triton_autotune()
        except Exception:  # no Triton here: fla will not import either
            return None
    try:
        from fla.ops.kda import chunk_kda
    except Exception:  # not installed, or no Triton/CUDA to import it with
        return None
    boundaries: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def fla_kda(q, k, v, g, beta):
        B, T, H, K = q.shape
        key = (B, T, str(q.device))
        if key not in boundaries:
            cpu = torch.arange(0, B * T + 1, T, dtype=torch.long)
            boundaries[key] = (cpu.to(q.device), cpu)
        cu_seqlens, cu_seqlens_cpu = boundaries[key]
        dtype = torch.bfloat16
        flat = lambda x, d: x.reshape(1, B * T, *x.shape[2:]).to(d).contiguous()  # noqa: E731
        # disable_recompute keeps the intermediate chunk results for the backward pass: fla's advice for
        # small models, whose activations are cheap to keep.
        o, _ = chunk_kda(
            flat(q, dtype),
            flat(k, dtype),
            flat(v, dtype),
            flat(g, torch.float32),
            flat(beta, dtype),
            use_qk_l2norm_in_kernel=False,
            disable_recompute=True,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
        )
        return o.reshape(B, T, *o.shape[2:]).float()

    return fla_kda


def kda_agreement(candidate, device, seed: int = 0, heads: int = 5, head_dim: int = 64) -> float:
    """The worst relative error of `candidate` against chunk_kda_autograd, outputs and input gradients,
    on random inputs with Kimi-like gates (some channels decaying by far more than fp32 can hold).
    The model's head count and size, so that the kernels compiled here are the ones training uses."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K = 2, 333, heads, head_dim
    q = l2norm(torch.randn(B, T, H, K, generator=gen)).to(device).requires_grad_()
    k = l2norm(torch.randn(B, T, H, K, generator=gen)).to(device).requires_grad_()
    v = torch.randn(B, T, H, K, generator=gen).to(device).requires_grad_()
    g = (-torch.rand(B, T, H, K, generator=gen) * torch.logspace(-3, 1.5, K)).to(device).requires_grad_()
    beta = torch.rand(B, T, H, generator=gen).to(device).requires_grad_()
    probe = torch.randn(B, T, H, K, generator=gen).to(device)
    results = []
    for fn in (chunk_kda_autograd, candidate):
        out = fn(q, k, v, g, beta)
        grads = torch.autograd.grad((out * probe).sum(), (q, k, v, g, beta))
        results.append([out.detach(), *grads])
    worst = 0.0
    for ref, got in zip(*results):
        error = (got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
        worst = max(worst, float(error) if torch.isfinite(error) else math.inf)
    return worst


def select_kda_function(
    backend: str, device: torch.device, log=print, heads: int = 5, head_dim: int = 64, pin_configs: bool = True
):
    """'torch': chunk_kda_autograd. 'fla': fla's kernels (an error if missing). 'auto': fla on CUDA when
    it is installed and agrees with chunk_kda_autograd within bf16 tolerance, else torch."""
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return chunk_kda_autograd, "torch"
    fla_kda = fla_chunk_kda_function(pin_configs)
    if fla_kda is None:
        if backend == "fla":
            raise SystemExit("--kda-backend fla: fla-core is not importable here")
        return chunk_kda_autograd, "torch"
    try:
        error = kda_agreement(fla_kda, device, heads=heads, head_dim=head_dim)
    except Exception as exc:  # a kernel that fails to compile or launch on this card
        if backend == "fla":
            raise
        log(f"fla's chunk_kda failed here ({type(exc).__name__}: {exc}); training with the PyTorch KDA")
        return chunk_kda_autograd, "torch"
    # bf16 inputs (fla's kernels take q, k, v in half precision): a few 1e-3 of relative error is the
    # rounding; more means the kernels do not compute this model's KDA.
    if error > 2e-2:
        if backend == "fla":
            raise SystemExit(f"--kda-backend fla: fla's chunk_kda differs from the reference by {error:.3g}")
        log(f"fla's chunk_kda differs from the reference by {error:.3g}; training with the PyTorch KDA")
        return chunk_kda_autograd, "torch"
    log(f"KDA through fla's Triton kernels (relative error {error:.2g} against the reference)")
    return fla_kda, "fla"


# -- layers ----------------------------------------------------------------------------------------
#
# Written out here rather than calling the engine modules' forward methods: those may dispatch to
# inference kernels on CUDA (Triton norms, decode paths) that have no backward. Each function is the
# engine's formula, casts included, over the module's own parameters; the equivalence test holds them to it.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (Llama style, no 1 + weight offset)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm times sigmoid(gate), in fp32 (fla's FusedRMSNormGated)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float() * torch.sigmoid(gate.float())).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's L2 norm: the eps sits inside the square root."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def swiglu(x: torch.Tensor, mlp) -> torch.Tensor:
    """down(SiLU(gate x) * up x): the dense layer 0 and the shared expert."""
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


def short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution from zero history, then SiLU: x [B, T, P], weight [P, 1, W]; the tap
    W - 1 multiplies the current token."""
    T, W = x.shape[1], weight.shape[-1]
    full = F.pad(x.float(), (0, 0, W - 1, 0))  # [B, W - 1 + T, P]
    taps = weight.float().squeeze(1).t()  # [W, P]
    y = full[:, W - 1 :] * taps[W - 1]
    for i in range(W - 1):
        y = y + full[:, i : i + T] * taps[i]
    return F.silu(y).to(x.dtype)


def kda_layer_forward(attn, config, x: torch.Tensor, kda_fn) -> torch.Tensor:
    """The KDA layer from an empty state (kimi-linear-spec.md §3.2), differentiable."""
    B, T, _ = x.shape
    H, K = config.kda_num_heads, config.kda_head_dim
    q = short_conv(attn.q_proj(x), attn.q_conv1d.weight)
    k = short_conv(attn.k_proj(x), attn.k_conv1d.weight)
    v = short_conv(attn.v_proj(x), attn.v_conv1d.weight)
    q = l2norm(q.view(B, T, H, K))  # [B, T, H, K] fp32
    k = l2norm(k.view(B, T, H, K))  # [B, T, H, K] fp32
    v = v.view(B, T, H, K)  # [B, T, H, V]
    f = attn.f_b_proj(attn.f_a_proj(x)).float() + attn.dt_bias
    g = -attn.A_log.float().exp() * F.softplus(f.view(B, T, H, K), threshold=20.0)  # [B, T, H, K]
    beta = torch.sigmoid(attn.b_proj(x).float())  # [B, T, H]
    o = kda_fn(q, k, v, g, beta).to(v.dtype)  # [B, T, H, V]
    gate = attn.g_b_proj(attn.g_a_proj(x)).view(B, T, H, K)
    o = gated_rms_norm(o, gate, attn.o_norm.weight, attn.o_norm.eps)
    return attn.o_proj(o.reshape(B, T, H * K))


def mla_layer_forward(attn, config, x: torch.Tensor) -> torch.Tensor:
    """MLA with NoPE (kimi-linear-spec.md §4.2): keys and values expanded from the latents, causal
    attention through SDPA, the same function as the engine's expanded prefill."""
    B, T, _ = x.shape
    H, L, R = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    nope, v_dim, qk_dim = config.qk_nope_head_dim, config.v_head_dim, config.qk_head_dim
    q = attn.q_proj(x).view(B, T, H, qk_dim)
    ckv = attn.kv_a_proj_with_mqa(x)  # [B, T, L + R]
    latent = rms_norm(ckv[..., :L], attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)
    k_rope = ckv[..., L:]
    kv = attn.kv_b_proj(latent).view(B, T, H, nope + v_dim)
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, R).to(k_nope.dtype)], dim=-1)
    q = q.to(k.dtype)
    # Zero columns bring v to the query width: the flash kernels take one head size for q, k and v.
    v_padded = F.pad(v, (0, qk_dim - v_dim)) if v_dim < qk_dim else v
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v_padded.transpose(1, 2), is_causal=True, scale=qk_dim**-0.5
    )  # [B, H, T, qk_dim]
    o = o.transpose(1, 2)[..., :v_dim]
    return attn.o_proj(o.reshape(B, T, H * v_dim))


def route(gate, config, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (expert ids [N, k], mixing weights [N, k] fp32): sigmoid (or softmax) scores, the
    selection bias only choosing (kimi-linear-spec.md §5.1), renormalised, times the scaling factor."""
    logits = x.float() @ gate.weight.float().t()  # [N, E]
    scores = logits.sigmoid() if config.moe_router_activation_func == "sigmoid" else logits.softmax(-1)
    biased = scores + gate.e_score_correction_bias.float()
    ids = biased.topk(config.num_experts_per_token, dim=-1, sorted=False).indices  # [N, k]
    weights = (biased if getattr(gate, "hf_alias_weights", False) else scores).gather(1, ids)
    if config.moe_renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * config.routed_scaling_factor


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{ids[:, j]}(x), float32 [N, D]: tokens grouped by expert, each chosen
    expert run once on all of its tokens."""
    N, k = ids.shape
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = flat.argsort()
    chosen, counts = flat[order].unique_consecutive(return_counts=True)
    token_of = order // k
    start = 0
    for e, n in zip(chosen.tolist(), counts.tolist()):
        rows = order[start : start + n]
        tokens = token_of[start : start + n]
        start += n
        xe = x[tokens]
        ye = F.linear(F.silu(F.linear(xe, experts.w1[e])) * F.linear(xe, experts.w3[e]), experts.w2[e])
        out = out.index_add(0, tokens, ye.float() * weights.reshape(-1)[rows, None])
    return out


def moe_forward(moe, config, x: torch.Tensor, expert_counts: dict | None, layer_index: int) -> torch.Tensor:
    """The MoE block, keeping how many tokens each expert received (for the balancing bias)."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    # The router scores in fp32, and autocast must not round its product to bf16: near-ties between
    # experts would then be broken differently from the model's own forward.
    with torch.autocast(device_type=x.device.type, enabled=False):
        ids, weights = route(moe.gate, config, flat.float())
    if expert_counts is not None:
        expert_counts[layer_index] = torch.bincount(ids.reshape(-1), minlength=config.num_experts).detach()
    out = routed_experts(flat, ids, weights, moe.experts).to(x.dtype).view(B, T, D)
    if moe.shared_experts is not None:
        out = out + swiglu(x, moe.shared_experts)
    return out


def decoder_layer_forward(layer, config, index: int, h: torch.Tensor, kda_fn, expert_counts) -> torch.Tensor:
    x = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.eps)
    if config.is_kda_layer(index):
        h = h + kda_layer_forward(layer.self_attn, config, x, kda_fn)
    else:
        h = h + mla_layer_forward(layer.self_attn, config, x)
    y = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    if config.is_moe_layer(index):
        return h + moe_forward(layer.block_sparse_moe, config, y, expert_counts, index)
    return h + swiglu(y, layer.mlp)


def training_hidden(
    model: KimiLinearForCausalLM,
    input_ids: torch.Tensor,
    kda_fn=chunk_kda_autograd,
    expert_counts: dict | None = None,
    checkpoint_layers: bool = False,
) -> torch.Tensor:
    """input_ids [B, T] -> the final norm's output [B, T, D]. With `checkpoint_layers`, each decoder
    layer's activations are recomputed in the backward pass instead of kept (memory for time)."""
    config = model.config
    h = model.model.embed_tokens(input_ids)  # [B, T, D]
    for index, layer in enumerate(model.model.layers):
        if checkpoint_layers and torch.is_grad_enabled():
            h = checkpoint(decoder_layer_forward, layer, config, index, h, kda_fn, expert_counts, use_reentrant=False)
        else:
            h = decoder_layer_forward(layer, config, index, h, kda_fn, expert_counts)
    return rms_norm(h, model.model.norm.weight, model.model.norm.eps)


def training_logits(model: KimiLinearForCausalLM, input_ids: torch.Tensor, kda_fn=chunk_kda_autograd) -> torch.Tensor:
    """[B, T] -> logits [B, T, vocab] float32, differentiable; the same function as the model's forward."""
    return model.lm_head(training_hidden(model, input_ids, kda_fn)).float()


def _weighted_cross_entropy(lm_head_weight, hidden, targets, weights):
    logits = F.linear(hidden, lm_head_weight).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def weighted_lm_loss(
    model: KimiLinearForCausalLM,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_tokens: int = 8192,
) -> torch.Tensor:
    """sum_t weights[t] * CE(lm_head(hidden[t]), targets[t]), over the positions with a weight.

    The logits of a long batch (tokens x vocab in fp32) would outweigh the whole model's activations;
    they are formed chunk by chunk and recomputed in the backward pass rather than kept.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets, flat_weights = targets.reshape(-1), weights.reshape(-1).float()
    rows = flat_weights.nonzero().squeeze(-1)
    flat_hidden, flat_targets, flat_weights = flat_hidden[rows], flat_targets[rows], flat_weights[rows]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        args = (model.lm_head.weight, flat_hidden[part], flat_targets[part], flat_weights[part])
        if torch.is_grad_enabled():
            total = total + checkpoint(_weighted_cross_entropy, *args, use_reentrant=False)
        else:
            total = total + _weighted_cross_entropy(*args)
    return total
