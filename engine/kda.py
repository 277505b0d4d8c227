"""The Kimi Delta Attention layer: owns its parameters (checkpoint names) and calls kernels/kda.

kimi-linear-spec.md §3.2 is the exact forward this follows. The state is updated in place (its storage
never moves, as a replayed CUDA graph needs).

One form on every device: the three short convolutions (one call over q, k and v side by side; in C on
an AVX2 CPU), then `prepare_kda` (q and k L2-normalised, the gate, beta's sigmoid: one pass over the raw
projections, a Triton kernel on the GPU), then the recurrence (`kda`: chunked for a prefill, in place for
a few tokens on the CPU). The prepass is a pass of its own because the gate and the norms taken inside
the chunked kernels made them spill registers: the GPU prefill was 1.7x slower that way.

A few new tokens (decode) take a fused path instead, where one runs: on the GPU the three short
convolutions in one launch, and the gate, the L2 norms and the sigmoid of beta inside the recurrent
kernel (a dozen launches where the form above takes several dozen, which matters once a decode step is
bound by kernel count); on an AVX2 CPU one C call from the raw projections through the output norm
(kernels/kda/avx2.py), which also reads the state once where the PyTorch form passes over it five times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.linear import Linear
from kimi_desk.engine.state import KDAState
from kimi_desk.kernels import use_triton
from kimi_desk.kernels.kda import RECURRENT_MAX_TOKENS, kda, prepare_kda, recurrent_kda_inplace
from kimi_desk.kernels.kda import avx2 as kda_avx2
from kimi_desk.kernels.kda.naive import log_decay
from kimi_desk.kernels.norm import gated_rms_norm


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm times sigmoid(gate), all in fp32 (fla's FusedRMSNormGated)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


def short_conv(x: torch.Tensor, weight: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time and SiLU: x [B, T, P], weight [P, 1, W] (the tap W - 1
    multiplies the current token), window [B, P, W - 1] (the inputs before x) -> (y [B, T, P] in x's
    dtype, the new window in the window's dtype)."""
    T, W = x.shape[1], weight.shape[-1]
    full = torch.cat([window.transpose(1, 2), x], dim=1).float()  # [B, W - 1 + T, P]
    taps = weight.float().squeeze(1).t()  # [W, P]
    # W shifted multiply-adds: cheaper than a grouped convolution call for W = 4, at any T.
    y = full[:, W - 1 :] * taps[W - 1]
    for i in range(W - 1):
        y = y + full[:, i : i + T] * taps[i]
    new_window = full[:, full.shape[1] - (W - 1) :].transpose(1, 2).to(window.dtype)
    return F.silu(y).to(x.dtype), new_window


class ShortConv(nn.Module):
    """The weight [P, 1, W] of a depthwise causal convolution over time followed by SiLU: the layer runs
    its three as one short_conv (or one kernel launch). The window lives in the state."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))


class KimiDeltaAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig):
        super().__init__()
        D, H, K = config.hidden_size, config.kda_num_heads, config.kda_head_dim
        P = H * K
        self.num_heads, self.head_dim = H, K
        self.conv_size = config.short_conv_kernel_size
        self.q_proj = Linear(D, P)
        self.k_proj = Linear(D, P)
        self.v_proj = Linear(D, P)
        self.q_conv1d = ShortConv(P, self.conv_size)
        self.k_conv1d = ShortConv(P, self.conv_size)
        self.v_conv1d = ShortConv(P, self.conv_size)
        # The forget and output gates are low rank, rank = head_dim (spec §1.2).
        self.f_a_proj = Linear(D, K)
        self.f_b_proj = Linear(K, P)
        self.dt_bias = nn.Parameter(torch.empty(P, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.b_proj = Linear(D, H)
        self.g_a_proj = Linear(D, K)
        self.g_b_proj = Linear(K, P)
        self.o_norm = GatedRMSNorm(K, config.rms_norm_eps)
        self.o_proj = Linear(P, D)
        # Joined at load time (engine/fuse.py): the six projections of x, and the gates' second halves.
        self.in_proj = None
        self.gates_b_proj = None

    def new_state(self, batch_size: int, dtype: torch.dtype, device) -> KDAState:
        H, K = self.num_heads, self.head_dim
        return KDAState(
            recurrent=torch.zeros(batch_size, H, K, K, dtype=torch.float32, device=device),
            conv=torch.zeros(batch_size, 3, H * K, self.conv_size - 1, dtype=dtype, device=device),
        )

    def forward(self, x: torch.Tensor, state: KDAState) -> torch.Tensor:
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        if T <= RECURRENT_MAX_TOKENS and self.conv_size == 4 and use_triton(x):
            return self._decode_fused(x, state)
        if state.written_to is not None:  # the paths below work in place: on a copy, where it is wanted
            state.written_to.recurrent.copy_(state.recurrent)
            state.written_to.conv.copy_(state.conv)
            state = KDAState(state.written_to.recurrent, state.written_to.conv)
        if T <= RECURRENT_MAX_TOKENS and not use_triton(x) and kda_avx2.takes(x, state.recurrent, state.conv):
            return self._decode_cpu(x, state)
        q_in, k_in, v_in, f_in, g_in, b_in = self.input_projections(x)
        # The three convolutions are depthwise: one call over q, k and v side by side is the same function
        # in a third of the operations.
        P = H * K
        if not use_triton(x) and kda_avx2.conv_takes(x, state.recurrent, state.conv):
            weights = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
            qkv = kda_avx2.short_conv((q_in, k_in, v_in), weights, state.conv).to(x.dtype)
        else:
            weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])
            qkv, window = short_conv(torch.cat([q_in, k_in, v_in], dim=-1), weight, state.conv.view(B, 3 * P, -1))
            state.conv.copy_(window.view(state.conv.shape))
        q, k, v = (t.view(B, T, H, K) for t in qkv.split(P, dim=-1))  # [B, T, H, K] each (V = K)
        # Unit q and k in x's dtype; the log decay -exp(A_log) * softplus(f + dt_bias) [B, T, H, K] and
        # beta [B, T, H] in fp32 (the decay is not bounded below).
        q, k, g, beta = prepare_kda(q, k, f_in.view(B, T, H, K), self.A_log, self.dt_bias, b_in)
        if T <= RECURRENT_MAX_TOKENS and not use_triton(x):
            o, recurrent = recurrent_kda_inplace(q, k, v, g, beta, state.recurrent), None
        else:
            o, recurrent = kda(q, k, v, g, beta, initial_state=state.recurrent, output_final_state=True)
        if recurrent is not None:
            state.recurrent.copy_(recurrent)
        o = self.o_norm(o, g_in.view(B, T, H, K))  # [B, T, H, V]
        return self.o_proj(o.reshape(B, T, H * K))

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The maps of x: q, k, v (before their convolutions), the forget gate's and the output gate's
        inputs (each through its two low-rank halves) and beta's logits; two products when they were
        joined at load time."""
        if self.in_proj is not None:
            q, k, v, gates_a, b = self.in_proj(x)
            f, g = self.gates_b_proj(gates_a)
            return q, k, v, f, g, b
        return (
            self.q_proj(x),
            self.k_proj(x),
            self.v_proj(x),
            self.f_b_proj(self.f_a_proj(x)),
            self.g_b_proj(self.g_a_proj(x)),
            self.b_proj(x),
        )

    def _decode_cpu(self, x: torch.Tensor, state: KDAState) -> torch.Tensor:
        """The same function for a few tokens on an AVX2 CPU: one C call from the raw projections through
        the output norm, the conv windows and the recurrent state advanced in place (in float32 also when
        the model computes in bf16, which then sees the output rounded once instead of every step)."""
        B, T, _ = x.shape
        o = kda_avx2.kda_decode_step(
            self.input_projections(x),
            (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight),
            state.conv,
            self.A_log,
            self.dt_bias,
            self.o_norm.weight,
            self.o_norm.eps,
            state.recurrent,
        )  # [B, T, H, V], float32 or bfloat16
        return self.o_proj(o.view(B, T, -1).to(x.dtype))

    def _decode_fused(self, x: torch.Tensor, state: KDAState) -> torch.Tensor:
        """The same function for a few tokens on the GPU, in Triton. The kernels read the projections
        raw (conv inputs, gate input, beta logits) and advance the conv windows and the recurrent state
        in place, or into `state.written_to`."""
        from kimi_desk.kernels.kda.fused_recurrent import fused_recurrent_kda_triton
        from kimi_desk.kernels.kda.short_conv import short_conv_update_triton

        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q_in, k_in, v_in, f_in, g_in, b_in = self.input_projections(x)
        target = state.written_to or state
        q, k, v = short_conv_update_triton(
            (q_in, k_in, v_in),
            (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight),
            state.conv,
            window_out=target.conv,
        )  # each [B, T, P], SiLU applied
        o, _ = fused_recurrent_kda_triton(
            q.view(B, T, H, K),
            k.view(B, T, H, K),
            v.view(B, T, H, K),
            f_in.view(B, T, H, K),
            b_in.contiguous(),
            initial_state=state.recurrent,
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            inplace_final_state=target is state,
            final_state_out=None if target is state else target.recurrent,
        )  # [B, T, H, V]
        o = self.o_norm(o, g_in.view(B, T, H, K))  # [B, T, H, V]
        return self.o_proj(o.reshape(B, T, H * K))


@torch.inference_mode()
def record_gates(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every KDA layer's log decay -exp(A_log) softplus(f + dt_bias) [B, T, H, K] (fp32, on the model's
    device) as the layer computes it while `model` reads input_ids [B, T] from a fresh state: the gates a
    trained model really produces, for the kernels' benchmark."""
    gates: list[torch.Tensor] = []
    layers = [m for m in model.modules() if isinstance(m, KimiDeltaAttention)]

    def recording(layer):
        plain = layer.input_projections

        def projections(x):
            out = plain(x)
            B, T = x.shape[:2]
            gates.append(log_decay(out[3].view(B, T, layer.num_heads, layer.head_dim), layer.A_log, layer.dt_bias))
            return out

        return projections

    for layer in layers:
        layer.input_projections = recording(layer)
    try:
        model(input_ids, model.new_state(input_ids.shape[0]))
    finally:
        for layer in layers:
            del layer.input_projections
    return gates
