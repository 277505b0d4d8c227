"""Kimi Linear, top to bottom: norms, MLP and MoE, MLA, the decoder block, the model.

Module and parameter names are those of the official checkpoint (kimi-linear-spec.md §2), except
that the routed experts of a MoE layer are stacked into three tensors; weights.py holds the table.
The model speaks token ids and an explicit ModelState:

    state = model.new_state(batch_size=1)
    logits = model(input_ids, state)                  # [B, T, vocab]; state advanced by T
    logits = model(input_ids, state, last_only=True)  # [B, 1, vocab]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.kda import KimiDeltaAttention
from kimi_desk.engine.linear import Linear
from kimi_desk.engine.state import MLACache, ModelState
from kimi_desk.kernels.mla import absorb_queries, fused_latents_writer, mla_attention, mla_prefill, values
from kimi_desk.kernels.moe import route, routed_experts, routed_experts_int4_cpu
from kimi_desk.kernels.norm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale (Llama style, no 1 + weight offset)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, its norm): one launch on a GPU, where the add alone would be another."""
        if delta is None:
            return residual, self(residual)
        return add_rms_norm(residual, delta, self.weight, self.eps)


class MLP(nn.Module):
    """down(SiLU(gate x) * up x): the dense layer 0 and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden)
        self.up_proj = Linear(dim, hidden)
        self.down_proj = Linear(hidden, dim)
        self.gate_up_proj = None  # gate and up joined at load time (engine/fuse.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Sigmoid (or softmax) scores; the correction bias only chooses experts.

    `hf_alias_weights` reproduces the Hugging Face remote code, whose in-place bias add makes the
    mixing weights read the biased scores (spec §5.1); the default follows vLLM and the DeepSeek-V3
    design, weighting by the unbiased scores.
    """

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_token
        self.activation = config.moe_router_activation_func
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.hf_alias_weights = False
        # Set when the shared expert is stacked with the routed ones (engine/fuse.py): its index, appended
        # to every token's choice with weight 1.
        self.shared_expert: int | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], weights [N, k] fp32); k + 1 columns with the shared expert."""
        return route(
            x,
            self.weight,
            self.e_score_correction_bias,
            self.top_k,
            self.activation,
            self.renormalize,
            self.scaling,
            weights_from_biased=self.hf_alias_weights,
            append=self.shared_expert,
        )


class Experts(nn.Module):
    """The routed experts, stacked: w1 (gate) and w3 (up) [E, I, D], w2 (down) [E, D, I]."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], chosen ids and mixing weights [N, k] -> sum_j weights[:, j] * expert_{ids[:, j]}(x),
        [N, D] in x's dtype (summed in float32, rounded once). Grouped products per chosen expert; on the
        GPU a few tokens (decode) take a Triton GEMV that never asks the host which experts were chosen
        (kernels/moe)."""
        if getattr(self, "cpu_weights", None) is not None:  # int4 in the CPU operator's layout (engine/quantize.py)
            return routed_experts_int4_cpu(x, ids, weights, self.cpu_weights, self.tiles, out_dtype=x.dtype)
        # Quantized experts (engine/quantize.py) carry a scale per output row beside each matrix (fp8,
        # int8), or a scale and a zero per group (int4).
        if hasattr(self, "w1_zero"):
            scales = tuple((getattr(self, f"w{i}_scale"), getattr(self, f"w{i}_zero")) for i in (1, 2, 3))
        else:
            scales = (self.w1_scale, self.w2_scale, self.w3_scale) if hasattr(self, "w1_scale") else None
        return routed_experts(x, ids, weights, self.w1, self.w2, self.w3, scales=scales, out_dtype=x.dtype)


class SparseMoE(nn.Module):
    # Forward calls of more tokens than this (prefill chunks) add their routers' choices to `usage` when
    # it is set (engine/usage.py); decode steps, and the CUDA graphs recorded from them, never do.
    COUNT_MIN_TOKENS = 32

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.gate = Router(config)
        self.usage: torch.Tensor | None = None  # [num_experts] int64 on the model's device, while counting
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        ids, weights = self.gate(flat)
        if self.usage is not None and B * T > self.COUNT_MIN_TOKENS and not _capturing(flat):
            chosen = ids[:, : self.gate.top_k].reshape(-1)  # without the shared expert's column (fuse.py)
            self.usage.index_add_(0, chosen, torch.ones_like(chosen))
        out = self.experts(flat, ids, weights).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class MultiHeadLatentAttention(nn.Module):
    """MLA with NoPE: the "rope" part of queries and the shared key is used but never rotated.

    Only the latents [c ‖ k_r] are cached (576 values per token at the 48B shapes). Decode attends in
    the absorbed form: per head, q_nope is mapped through W_UK into the latent space, so every head
    reads the same keys (MQA), and the attended latent is mapped through W_UV to the head's value space.
    Prefill expands keys and values from the latents block by block, which costs fewer operations when
    many queries share each key.
    """

    # From this many new tokens on, attention expands keys and values from the latents (fewer operations
    # per query and key); below it, decode reads the latents directly through absorbed queries.
    EXPANDED_MIN_TOKENS = 64

    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.scale = config.qk_head_dim**-0.5
        self.q_proj = Linear(D, H * config.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(D, config.kv_lora_rank + config.qk_rope_head_dim)
        # The remote code builds this norm without passing eps, so it keeps the class default 1e-6.
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim))
        self.o_proj = Linear(H * config.v_head_dim, D)
        self.in_proj = None

    def new_state(self, batch_size: int, dtype: torch.dtype, device) -> MLACache:
        return MLACache(batch_size, self.latent_dim + self.rope_dim, dtype, device)

    def forward(self, x: torch.Tensor, cache: MLACache) -> torch.Tensor:
        B, T, _ = x.shape
        H, L = self.num_heads, self.latent_dim
        start = cache.start  # an int; a device tensor while a decode step is recorded (state.py)
        if self.in_proj is not None:  # q and the latent projection joined at load time (engine/fuse.py)
            q, ckv = self.in_proj(x)
        else:
            q, ckv = self.q_proj(x), self.kv_a_proj_with_mqa(x)  # ckv [B, T, L + R]
        q = q.view(B, T, H, self.nope_dim + self.rope_dim)
        write = fused_latents_writer(ckv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cache.buffer.dtype)
        if write is not None:
            cached = cache.append_written(T, write)  # [B, start + T, L + R] (the whole buffer while recording)
        else:
            cached = cache.append(torch.cat([self.kv_a_layernorm(ckv[..., :L]), ckv[..., L:]], dim=-1))
        if T >= self.EXPANDED_MIN_TOKENS:
            shape, parts = (H, self.nope_dim + self.v_dim, L), [self.nope_dim, self.v_dim]
            w_uk, w_uv = self.kv_b_proj.weight.view(shape).split(parts, 1)  # [H, n, L], [H, v, L]
            o = mla_prefill(q, cached, w_uk, w_uv, start, self.scale).to(x.dtype)  # [B, T, H, v]
        else:
            weight = self.kv_b_proj.weight
            q_abs = absorb_queries(q, weight, self.nope_dim, self.v_dim, cache.buffer.dtype)  # [B, T, H, L + R]
            # The whole buffer, rows past the new tokens unread: the GPU kernel's launch then depends on
            # the shapes alone, and eager and recorded decode steps compute the same thing.
            attended = mla_attention(q_abs, cache.buffer, start, L, self.scale)  # [B, T, H, L] fp32
            o = values(attended, weight, self.nope_dim, self.v_dim, x.dtype)  # [B, T, H, v]
        return self.o_proj(o.reshape(B, T, H * self.v_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = (
            KimiDeltaAttention(config) if config.is_kda_layer(layer_idx) else MultiHeadLatentAttention(config)
        )
        # The checkpoint names the MoE block `block_sparse_moe` and the dense one `mlp`.
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, layer_state) -> tuple[torch.Tensor, torch.Tensor]:
        """h + attention(norm(h)), then + ffn(norm(.)), with each residual add joined to the norm after
        it: `pending` is the previous layer's output, not yet added to h (None before the first layer),
        and the returned pair is (h, this layer's output still to be added)."""
        h, x = self.input_layernorm.add_and_norm(h, pending)
        h, x = self.post_attention_layernorm.add_and_norm(h, self.self_attn(x, layer_state))
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return h, ffn(x)


class Backbone(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class KimiLinearForCausalLM(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        self.config = config
        # Set by load_model from the checkpoint's files; ties snapshots to these weights.
        self.fingerprint = "unloaded"
        # The MLA caches' dtype when not the activations' (load_model: engine/memory.py mla_cache_dtype);
        # `latent_cache_dtype` is the one in use.
        self.cache_dtype: torch.dtype | None = None
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the final norm's weight has it whatever the weights are stored in)."""
        return self.model.norm.weight.dtype

    @property
    def latent_cache_dtype(self) -> torch.dtype:
        """The MLA caches' dtype: `cache_dtype` where load_model set one, else the activations'."""
        return self.cache_dtype or self.dtype

    def new_state(self, batch_size: int = 1) -> ModelState:
        def dtype(attention) -> torch.dtype:
            return self.latent_cache_dtype if isinstance(attention, MultiHeadLatentAttention) else self.dtype

        return ModelState(
            [layer.self_attn.new_state(batch_size, dtype(layer.self_attn), self.device) for layer in self.model.layers]
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, state: ModelState, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] int64 -> logits [B, T, vocab] (or [B, 1, vocab]) float32; advances `state`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != state.batch_size:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]}, the state {state.batch_size}")
        h = self.model.embed_tokens(input_ids.to(self.device))  # [B, T, D]
        pending = None
        for layer, layer_state in zip(self.model.layers, state.layers):
            h, pending = layer(h, pending, layer_state)
        state.position += input_ids.shape[1]
        if last_only:
            h, pending = h[:, -1:], pending[:, -1:]
        return self.lm_head(self.model.norm.add_and_norm(h, pending)[1]).float()
