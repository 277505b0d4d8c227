"""Where the weights live when the model does not fit on the GPU: a memory budget and a plan.

    budget = parse_size("24GiB")                                   # --gpu-memory / --cpu-memory
    plan = plan_placement(config, "bfloat16", "int4", gpu_budget=budget, cpu_budget=64 << 30)
    plan.describe()  # "GPU 22.8 GiB: attention, shared experts, 1,024 of 6,656 routed experts; RAM 19.5 GiB: the others"

What every token needs goes on the GPU first: the attention and KDA layers, the dense layer, the shared
experts, the routers and norms, the embedding and the output head, the MLA cache for the context asked
for, the KDA states (and the copy a chat turn branches from), one prefill chunk's working set. Then as
many routed experts as fit, the most used first where usage is known (engine/usage.py: counted while
documents are read; chosen over every (layer, expert) pair, so a layer whose choices are concentrated
holds fewer than one whose choices are spread), else the same number in every MoE layer; the others
stay in system RAM, read there by the GPU at decode and streamed to the GPU at prefill (engine/offload.py),
which needs two staging slots of one layer's routed experts on the GPU, and two banks of
DECODE_STREAM_SLOTS experts' room for the decode token's RAM experts gathered ahead of the choice.

Pure logic over the config: the bytes come from memory.py's per-parameter rule, so the plan, the check
before loading and what loading allocates agree. Refusals are one line (PlacementError) and name the
smallest budget that works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.memory import MemoryCheckError

GIB = 1 << 30
# Left free on the card when no --gpu-memory is given: the CUDA context, the allocator's fragmentation,
# the kernels' scratch (Triton, cuBLAS workspaces), the CUDA graph's pool.
GPU_MARGIN_BYTES = 3 * GIB // 2
# Left free in RAM when no --cpu-memory is given: the rest of the desktop.
CPU_MARGIN_BYTES = 2 * GIB
# Staging slots for prefill's streamed experts (double buffering: one filling while the other computes).
STAGING_SLOTS = 2
# Experts' room on the GPU for decode's RAM experts gathered ahead on a guess (engine/offload.py's
# InPlaceDecode): a router's top k.
DECODE_STREAM_SLOTS = 8
# Banks of those slots: a layer's guessed experts are gathered into one while the previous layer's are
# read from the other.
DECODE_STREAM_BANKS = 2

_UNITS = {
    "": None,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


class PlacementError(MemoryCheckError):
    """A budget the model cannot be placed in; one line naming the smallest that works."""


def parse_size(text: str, option: str = "size") -> int:
    """'24GiB', '16GB', '512 MiB', '1.5T' -> bytes (GB = 10^9, GiB = 2^30). A bare number, an unknown
    unit or a size under 1 MiB is a PlacementError naming `option`."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise PlacementError(f"{option} {str(text)[:40]!r} is not a size: write it like 24GiB, 16GB or 512MiB")
    if _UNITS[unit] is None:
        raise PlacementError(f"{option} {text.strip()!r} needs a unit: 24GiB, 16GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1 << 20:
        raise PlacementError(f"{option} {text.strip()!r} is too small to hold anything")
    return value


def format_gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def format_tokens(n: int) -> str:
    """1234567 -> '1.2 M tokens', 45600 -> '45.6 k tokens', 950 -> '950 tokens'."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} M tokens"
    if n >= 1000:
        return f"{n / 1e3:.1f} k tokens"
    return f"{n:,} tokens"


def _ceil_tenth_gib(n: float) -> str:
    """A size for the command line that is at least n: rounded up to a tenth of a GiB."""
    return f"{math.ceil(n / GIB * 10) / 10:.1f}GiB"


@dataclass(frozen=True)
class Placement:
    """Which routed experts of each MoE layer live on the GPU, and the bytes on either side.

    `gpu_experts[layer]` (0-based decoder layer index) lists the expert ids held on the GPU, ascending;
    the layer's other experts live in RAM. `fixed_bytes` is what every token needs on the GPU (module
    doc), `expert_bytes` one routed expert in its format, `staging_bytes` the prefill slots (zero when
    every expert is on the GPU)."""

    num_experts: int
    gpu_experts: Mapping[int, tuple[int, ...]]
    fixed_bytes: int
    expert_bytes: int
    staging_bytes: int
    gpu_budget: int | None = None
    cpu_budget: int | None = None
    quantize: str | None = None
    context_tokens: int = 0
    notes: tuple[str, ...] = field(default=())
    # The tokens read whose expert usage chose the GPU's experts; None when usage was not known.
    usage_tokens: int | None = None

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.gpu_experts)

    def ram_experts(self, layer: int) -> tuple[int, ...]:
        on_gpu = set(self.gpu_experts[layer])
        return tuple(e for e in range(self.num_experts) if e not in on_gpu)

    @property
    def total_experts(self) -> int:
        return self.num_experts * len(self.gpu_experts)

    @property
    def gpu_count(self) -> int:
        return sum(len(v) for v in self.gpu_experts.values())

    @property
    def ram_count(self) -> int:
        return self.total_experts - self.gpu_count

    @property
    def offloaded(self) -> bool:
        return self.ram_count > 0

    @property
    def gpu_bytes(self) -> int:
        return self.fixed_bytes + self.gpu_count * self.expert_bytes + self.staging_bytes

    @property
    def ram_bytes(self) -> int:
        return self.ram_count * self.expert_bytes

    def describe(self) -> str:
        """The one line said at start."""
        if not self.offloaded:
            return f"GPU {format_gib(self.gpu_bytes)}: the whole model"
        if self.gpu_count == 0:
            on_gpu = "no routed experts"
        else:
            on_gpu = f"{self.gpu_count:,} of {self.total_experts:,} routed experts"
            if self.usage_tokens is not None:
                on_gpu += f", the most used first (usage of {format_tokens(self.usage_tokens)} read)"
        return (
            f"GPU {format_gib(self.gpu_bytes)}: attention, shared experts, {on_gpu}; "
            f"RAM {format_gib(self.ram_bytes)}: the others"
        )

    def to_dict(self) -> dict:
        return {
            "gpu_bytes": self.gpu_bytes,
            "ram_bytes": self.ram_bytes,
            "fixed_bytes": self.fixed_bytes,
            "expert_bytes": self.expert_bytes,
            "staging_bytes": self.staging_bytes,
            "gpu_experts": self.gpu_count,
            "ram_experts": self.ram_count,
            "total_experts": self.total_experts,
            "gpu_budget": self.gpu_budget,
            "cpu_budget": self.cpu_budget,
            "usage_tokens": self.usage_tokens,
            "describe": self.describe(),
        }


def expert_bytes(config: KimiLinearConfig, dtype, quantize: str | None) -> int:
    """Bytes one routed expert takes (its three matrices, with their scales) in `quantize`."""
    from kimi_desk.engine.memory import _BYTES_PER_DTYPE, _dtype_name, weight_bytes

    compute = _BYTES_PER_DTYPE[_dtype_name(dtype)]
    layer = config.moe_layers[0]
    D, inner = config.hidden_size, config.moe_intermediate_size
    prefix = f"model.layers.{layer}.block_sparse_moe.experts."
    return int(
        sum(
            weight_bytes(prefix + w, shape, quantize, compute)
            for w, shape in (("w1", (inner, D)), ("w2", (D, inner)), ("w3", (inner, D)))
        )
    )


def staging_experts(num_experts: int) -> int:
    """Experts' room on the GPU for experts in RAM, counted in experts of a layer of `num_experts`:
    prefill's staging slots and decode's streamed ones."""
    return STAGING_SLOTS * num_experts + DECODE_STREAM_BANKS * DECODE_STREAM_SLOTS


def plan_placement(
    config: KimiLinearConfig,
    dtype,
    quantize: str | None,
    *,
    gpu_budget: int,
    cpu_budget: int | None = None,
    context_tokens: int | None = None,
    prefill_chunk: int = 8192,
    usage: Mapping[int, Sequence[float]] | None = None,
    usage_tokens: int | None = None,
    model_name: str | None = None,
) -> Placement:
    """The placement of the model in `quantize` within `gpu_budget` bytes of GPU memory and `cpu_budget`
    bytes of RAM (None: RAM unchecked). `usage[layer][expert]`: how often each expert was chosen (any
    scale; engine/usage.py), `usage_tokens` the tokens it was counted over (for the description): the
    GPU's experts are the most used over all the MoE layers, as many as the budget holds, so layers may
    get different numbers; without usage every layer gets the same. PlacementError when the budgets
    cannot hold it."""
    from kimi_desk.engine.memory import estimate_memory

    estimate = estimate_memory(config, dtype, quantize, context_tokens=context_tokens, prefill_chunk=prefill_chunk)
    layers = config.moe_layers
    E = config.num_experts
    per_expert = expert_bytes(config, dtype, quantize)
    total_experts = E * len(layers)
    fixed = estimate["total_bytes"] - total_experts * per_expert
    name = model_name or "the model"
    fmt = f"{quantize} weights" if quantize else estimate["dtype"]
    common = dict(
        num_experts=E,
        fixed_bytes=fixed,
        expert_bytes=per_expert,
        gpu_budget=gpu_budget,
        cpu_budget=cpu_budget,
        quantize=quantize,
        context_tokens=estimate["context_tokens"],
    )
    if fixed + total_experts * per_expert <= gpu_budget:
        return Placement(gpu_experts={i: tuple(range(E)) for i in layers}, staging_bytes=0, **common)
    staging = staging_experts(E) * per_expert
    room = gpu_budget - fixed - staging
    # The smallest GPU budget that works here: the fixed part, the slots, and whatever RAM cannot take.
    ram_room = total_experts if cpu_budget is None else min(total_experts, cpu_budget // per_expert)
    smallest = fixed + staging + (total_experts - ram_room) * per_expert
    if room < 0:
        raise PlacementError(
            f"--gpu-memory {format_gib(gpu_budget)} is too small for {name} in {fmt}: what every token needs "
            f"(attention, shared experts, embedding, head, caches for {estimate['context_tokens']:,} tokens, "
            f"prefill slots) takes {format_gib(fixed + staging)}; the smallest budget that works is "
            f"--gpu-memory {_ceil_tenth_gib(smallest)}"
        )
    count = min(total_experts, room // per_expert)
    gpu_experts = _choose(layers, E, count, usage)
    ram_bytes = (total_experts - count) * per_expert
    if cpu_budget is not None and ram_bytes > cpu_budget:
        advice = (
            f"raise --gpu-memory to {_ceil_tenth_gib(smallest)}"
            if ram_room > 0 or smallest <= gpu_budget
            else "free some RAM"
        )
        if quantize != "int4":
            advice += " or use --quantize int4"
        raise PlacementError(
            f"{total_experts - count:,} routed experts of {name} do not fit in --gpu-memory {format_gib(gpu_budget)} "
            f"and need {format_gib(ram_bytes)} of RAM, but --cpu-memory is {format_gib(cpu_budget)}: {advice}"
        )
    decided = usage_tokens if usage and count else None
    return Placement(gpu_experts=gpu_experts, staging_bytes=staging, usage_tokens=decided, **common)


def _choose(layers: list[int], E: int, count: int, usage) -> dict[int, tuple[int, ...]]:
    """`count` (layer, expert) pairs for the GPU: the most used first over all the layers, else spread
    evenly over the layers (the first layers take the remainder), lowest ids first. Pairs used equally
    often (the never used ones, after a short reading) take turns between the layers, lowest ids first."""
    chosen: dict[int, list[int]] = {i: [] for i in layers}
    if usage:
        ranked = []
        for i in layers:
            row = [float(c) for c in usage.get(i, [0] * E)]
            if len(row) != E:
                raise ValueError(f"usage of layer {i} has {len(row)} experts, the model {E}")
            turn, previous = 0, None
            for e in sorted(range(E), key=lambda e: (-row[e], e)):
                turn = turn + 1 if row[e] == previous else 0  # its turn among the layer's equally used
                previous = row[e]
                ranked.append((-row[e], turn, i, e))
        for _, _, i, e in sorted(ranked)[:count]:
            chosen[i].append(e)
    else:
        each, extra = divmod(count, len(layers)) if layers else (0, 0)
        for n, i in enumerate(layers):
            chosen[i] = list(range(each + (n < extra)))
    return {i: tuple(sorted(v)) for i, v in chosen.items()}


def default_gpu_budget(free_bytes: int) -> int:
    """What the card has free, less a margin (GPU_MARGIN_BYTES, or a tenth of it when that is more)."""
    return max(0, free_bytes - max(GPU_MARGIN_BYTES, free_bytes // 10))


def default_cpu_budget(available_bytes: int | None) -> int | None:
    return None if available_bytes is None else max(0, available_bytes - CPU_MARGIN_BYTES)
