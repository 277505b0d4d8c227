"""Routed experts split between the GPU and system RAM, as a placement (engine/placement.py) says.

A MoE layer with experts in RAM holds them in an OffloadedExperts: `on_gpu` and `in_ram`, two Experts
stacks of the layer's experts by placement, and id maps from the layer's expert ids to each stack's
rows. The model's other parts, its state and its name table are those of the whole model: the state
does not depend on where the weights live, so a session read under one placement resumes under any
other, and the quantized cache holds the stacked tensors whatever the placement.

Decode (up to DECODE_MAX_TOKENS tokens), with a GPU and int4 experts (InPlaceDecode): the GPU computes
the chosen RAM experts itself, reading their tiles over PCIe from pinned host memory, for one token most
of them gathered ahead into a bank of slots in GPU memory on the next layer's router's guess; no host
step, so a decode step is one CUDA graph. Otherwise (int8 or bf16 experts; the CPU as the GPU side):
the router's choice and the tokens go to the host in one round trip; the GPU computes its chosen experts
(the RAM ones masked with weight 0) while the CPU computes the RAM ones (int4 through PyTorch's CPU
operator, int8 and bf16 dequantized per expert; torch's threads), and the CPU's sum comes back to be
added on the GPU. The round trip goes through fixed (pinned) host buffers of the layer, so that a
decode step can be recorded as CUDA graphs cut at the host's steps (engine/cuda_graph.py): the GPU's
work from one layer's join to the next layer's hand-over is one graph.

Prefill (more than DECODE_MAX_TOKENS tokens, or fewer whose RAM pairs outnumber the layer's RAM experts
when they would be read in place): every expert of the layer is chosen by some token of a large chunk,
so the layer's RAM experts are streamed to the GPU instead, into one of two staging slots
that hold the layer's whole stack (the GPU rows copied device to device): while one layer computes from
its slot, the next offloaded layer's experts are copied into the other on a side stream (Stager). int4
experts are kept in RAM in the CPU operator's tiles only; the GPU turns the streamed tiles back into
kernels/quant's layout (a relayout, no rounding: kernels/quant/cpu.py's `tiles_to_codes`).

The "GPU side" is whatever device the model's other parameters are on: with the CPU there, both
halves run on the CPU (no streams, no pinning), which is how the tests compare this path with the
whole model.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kimi_desk.engine.placement import DECODE_STREAM_BANKS, DECODE_STREAM_SLOTS
from kimi_desk.engine.quantize import int4_experts_to_cpu_layout
from kimi_desk.kernels.quant import dequantize_rows
from kimi_desk.kernels.quant.cpu import (
    JOINED,
    cpu_int4_fits,
    cpu_int4_layout,
    int4_expert_cpu,
    int4_experts_stacked,
    tiles_to_codes,
    tiles_to_scales,
)
from kimi_desk.kernels.quant.naive import dequantize_int4_groups

# Tokens up to which a chunk's RAM experts are taken one (token, expert) pair at a time (read in place by
# the GPU, or computed on the CPU); more (prefill chunks) stream each layer's whole RAM stack to the GPU.
# A rule, not yet a measurement: the pairs grow with the tokens while streaming costs one layer's RAM
# experts whatever the chunk, and at a few dozen tokens a chunk already chooses most experts.
DECODE_MAX_TOKENS = 32
# Experts per copy and relayout when streaming int4 tiles (bounds the relayout's temporaries).
STREAM_BLOCK = 16


@dataclass
class HostBuffers:
    """One layer's decode round trip through host memory: the tokens, the RAM rows and their weights
    copied from the GPU side, the CPU's float32 sum copied back (each [decode_max_tokens, ...])."""

    x: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor


@dataclass
class OffloadStats:
    """Where the time of the offloaded layers went, since the last reset (the bench's breakdown)."""

    cpu_seconds: float = 0.0  # the CPU's expert products
    wait_seconds: float = 0.0  # the host waiting for the router's choice (the GPU's work before it)
    d2h_bytes: int = 0
    h2d_bytes: int = 0  # the CPU's sums going back
    streamed_bytes: int = 0  # RAM experts copied to the GPU side: prefill's staging slots
    decode_calls: int = 0
    streamed_calls: int = 0
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


def _experts_class():
    from kimi_desk.engine.model import Experts

    return Experts


class OffloadedExperts(nn.Module):
    """A MoE layer's routed experts, `gpu_ids` in `on_gpu` and the others in `in_ram` (module doc)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, gpu_ids, ram_ids):
        super().__init__()
        Experts = _experts_class()
        self.num_experts = num_experts
        self.gpu_ids, self.ram_ids = list(gpu_ids), list(ram_ids)
        self._gpu_rows = {e: i for i, e in enumerate(self.gpu_ids)}
        self._ram_rows = {e: i for i, e in enumerate(self.ram_ids)}
        self.on_gpu = Experts(len(self.gpu_ids), dim, hidden)
        self.in_ram = Experts(len(self.ram_ids), dim, hidden)
        # Both halves keep kernels/quant's layout through prepare_for_cpu: the RAM half takes the CPU
        # operator's tiles here (prepare_ram), the GPU half's rows are copied into the staging slots.
        self.on_gpu.keep_layout = self.in_ram.keep_layout = True
        self.runtime: OffloadRuntime | None = None
        self._host: HostBuffers | None = None
        # Set by finish_offload: this layer's bank of decode streaming slots (0 or 1, alternating over the
        # offloaded layers) and (the next offloaded layer, its router), for the guess (module doc). A
        # tuple, so that the other layer's modules are not registered as this one's.
        self.stream_bank = 0
        self.next_layer: tuple[OffloadedExperts, nn.Module] | None = None

    def row_of(self, expert: int) -> tuple[str, int]:
        """('on_gpu' or 'in_ram', the row of that stack) of expert id `expert`."""
        if expert in self._gpu_rows:
            return "on_gpu", self._gpu_rows[expert]
        return "in_ram", self._ram_rows[expert]

    def finish(self, device: torch.device, runtime: "OffloadRuntime") -> None:
        """After loading: the id maps on `device` (-1 for the other side's experts), the RAM half in its
        CPU layout (pinned when the GPU side is a GPU)."""
        gpu_index = torch.full((self.num_experts,), -1, dtype=torch.int64)
        ram_index = torch.full((self.num_experts,), -1, dtype=torch.int64)
        gpu_index[self.gpu_ids] = torch.arange(len(self.gpu_ids))
        ram_index[self.ram_ids] = torch.arange(len(self.ram_ids))
        self.gpu_index, self.ram_index = gpu_index.to(device), ram_index.to(device)
        # Weakly: the runtime (the model's) holds this layer through its stager, and a cycle would keep a
        # dropped model's GPU memory until the cycle collector happens to run.
        self.runtime = weakref.proxy(runtime)
        prepare_ram(self.in_ram, pin=device.type == "cuda")

    # -- the forward pass ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """As Experts.forward: x [N, D], ids and weights [N, k] -> [N, D] in x's dtype."""
        if x.shape[0] > self.runtime.decode_max_tokens:
            return self._streamed(x, ids, weights)
        if self.runtime.in_place is not None:
            ram_rows = self.ram_index[ids]  # [N, k], -1 for the GPU's experts
            # A chunk of a few tokens (never recorded in a graph, so the host may count): reading its pairs
            # one by one costs more bytes than the layer's whole RAM stack once they outnumber it.
            if x.shape[0] > 1 and int((ram_rows >= 0).sum()) > len(self.ram_ids):
                return self._streamed(x, ids, weights)
            return self._in_place(x, ids, ram_rows, weights)
        return self._split(x, ids, weights)

    def _split(self, x, ids, weights):
        """Decode (module doc). The tokens, the RAM rows and their weights go to the layer's fixed host
        buffers, the GPU's experts are queued, and the CPU's sum comes back from a fixed host buffer: the
        host's two steps between them (`handed_over`, `join`) go through `runtime.host_step`, which runs
        them now or, while engine/cuda_graph.py records a decode step, cuts the recording there so that
        they run between the replayed graphs."""
        runtime, N = self.runtime, x.shape[0]
        host = self._host_buffers(x, weights)
        hx, hrows, hweights, hout = host.x[:N], host.rows[:N], host.weights[:N], host.out[:N]
        gpu_rows, ram_rows = self.gpu_index[ids], self.ram_index[ids]  # [N, k], -1 on the other side
        hx.copy_(x, non_blocking=True)
        hrows.copy_(ram_rows, non_blocking=True)
        hweights.copy_(weights, non_blocking=True)
        ready = runtime.ready

        def handed_over():  # the copies to the host are queued: mark the point the host waits for
            if ready is not None:
                ready.record()

        def join():  # wait for the copies, compute the RAM experts, leave their sum for the GPU to fetch
            stats = runtime.stats
            start = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            begun = time.perf_counter()
            hout.copy_(ram_experts_forward(self.in_ram, hx, hrows, hweights))
            seconds = time.perf_counter() - begun
            stats.wait_seconds += begun - start
            stats.cpu_seconds += seconds
            stats.decode_calls += 1
            stats.d2h_bytes += sum(t.numel() * t.element_size() for t in (hx, hrows, hweights))
            stats.h2d_bytes += hout.numel() * hout.element_size()

        if self.gpu_ids:
            # The GPU's experts are queued between the two steps, so that both sides work at once.
            runtime.host_step(handed_over)
            out = self.on_gpu(x, gpu_rows.clamp(min=0), torch.where(gpu_rows >= 0, weights, 0.0)).float()
            runtime.host_step(join)
            out = out + hout.to(x.device, non_blocking=True, copy=True)
        else:
            runtime.host_step(lambda: (handed_over(), join()))
            out = hout.to(x.device, non_blocking=True, copy=True)
        return out.to(x.dtype)

    def _in_place(self, x, ids, ram_rows, weights):
        """Decode with InPlaceDecode: for one token the guess for the next offloaded layer queued first (its
        gather then overlaps this layer's work), then the RAM experts read by the GPU, then its own."""
        decoder = self.runtime.in_place
        if self.next_layer is not None and x.shape[0] == 1:
            following, router = self.next_layer
            guess, _ = router(x)  # [1, k] (+ a shared expert's column, left out)
            decoder.gather(following, following.ram_index[guess[0, : router.top_k]])
        gpu_rows = self.gpu_index[ids]  # [N, k], -1 for the RAM's experts
        out = decoder.forward(self, x, ram_rows, weights)
        if self.gpu_ids:
            out = out + self.on_gpu(x, gpu_rows.clamp(min=0), torch.where(gpu_rows >= 0, weights, 0.0)).float()
        return out.to(x.dtype)

    def _host_buffers(self, x: torch.Tensor, weights: torch.Tensor) -> "HostBuffers":
        """The layer's host buffers for up to `decode_max_tokens` tokens like `x` (pinned when x is on a
        GPU), made at the first decode call and kept: a recorded graph copies to and from their
        addresses."""
        host = self._host
        k = weights.shape[-1]
        if host is None or host.x.dtype != x.dtype or host.rows.shape[-1] != k:
            n, pin = self.runtime.decode_max_tokens, x.is_cuda
            host = self._host = HostBuffers(
                x=torch.empty(n, x.shape[-1], dtype=x.dtype, pin_memory=pin),
                rows=torch.empty(n, k, dtype=torch.int64, pin_memory=pin),
                weights=torch.empty(n, k, dtype=weights.dtype, pin_memory=pin),
                out=torch.empty(n, x.shape[-1], dtype=torch.float32, pin_memory=pin),
            )
        return host

    def _streamed(self, x, ids, weights):
        from kimi_desk.kernels.moe import routed_experts

        slot = self.runtime.stager.fetch(self)
        self.runtime.stats.streamed_calls += 1
        out = routed_experts(
            x, ids, weights, slot["w1"], slot["w2"], slot["w3"], scales=slot["scales"], out_dtype=x.dtype
        )
        self.runtime.stager.done(self)
        return out


# -- the RAM half -------------------------------------------------------------------------------------


def prepare_ram(experts: nn.Module, pin: bool) -> None:
    """int4 experts in RAM to the CPU operator's tiles, w1 and w3 joined (kernels/quant/cpu.py), each
    of the two matrices stacked over the experts in one tensor (so that one copy streams a run of
    experts), `experts.cpu_weights[row]` the per-expert views the CPU products take; other formats stay
    as they are. Pinned for asynchronous copies if asked."""
    n = experts.w1.shape[0]
    int4 = hasattr(experts, "w1_zero")
    if int4 and n and all(_tiles_fit(getattr(experts, w)) for w in ("w1", "w2", "w3")):
        int4_experts_to_cpu_layout(experts, pin)
    elif pin:
        for name, tensor in [*experts.named_parameters(recurse=False), *experts.named_buffers(recurse=False)]:
            pinned = tensor.data.pin_memory()
            if isinstance(tensor, nn.Parameter):
                setattr(experts, name, nn.Parameter(pinned, requires_grad=False))
            else:
                setattr(experts, name, pinned)


def _tiles_fit(codes: torch.Tensor) -> bool:
    """Whether the CPU operator takes these int4 matrices and its tiles can be turned back (rows in
    whole blocks of its layout)."""
    out_features, in_features = codes.shape[-2], codes.shape[-1] * 2
    return cpu_int4_fits(out_features, in_features) and out_features % cpu_int4_layout().rows == 0


def ram_experts_forward(experts: nn.Module, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over the pairs with rows >= 0 of weights * expert_row(x) on the CPU: x [N, D], rows and
    weights [N, k] -> [N, D] float32. Each chosen expert runs once on all its tokens. The grouping is
    done on Python lists: at decode's few tokens, a tensor op per step (sorting, unique, indexing) would
    cost more than the bookkeeping it does, and this runs once per MoE layer per token. Stacked int4
    experts: one kernel call for all of them (kernels/quant/cpu.py)."""
    N = rows.shape[0]
    stacks = getattr(experts, "tiles", None)
    if stacks is not None:
        out = int4_experts_stacked(x, rows, weights, stacks)
        if out is not None:
            return out
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32)
    tokens_of: dict[int, list[tuple[int, float]]] = {}
    for token, (row_ids, row_weights) in enumerate(zip(rows.tolist(), weights.tolist())):
        for e, w in zip(row_ids, row_weights):
            if e >= 0:
                tokens_of.setdefault(e, []).append((token, w))
    for e, pairs in tokens_of.items():
        if len(pairs) == 1:
            token, w = pairs[0]
            out[token].add_(_expert_product(experts, e, x[token : token + 1])[0].float(), alpha=w)
            continue
        tokens = torch.tensor([t for t, _ in pairs])
        y = _expert_product(experts, e, x[tokens]).float()
        out.index_add_(0, tokens, y * torch.tensor([w for _, w in pairs])[:, None])
    return out


def _expert_product(experts: nn.Module, e: int, xe: torch.Tensor) -> torch.Tensor:
    cpu_weights = getattr(experts, "cpu_weights", None)
    if cpu_weights is not None:
        return int4_expert_cpu(xe, cpu_weights[e])
    mats = []
    for attr in ("w1", "w2", "w3"):
        w = getattr(experts, attr)[e]
        if hasattr(experts, f"{attr}_zero"):
            w = dequantize_int4_groups(
                w, getattr(experts, f"{attr}_scale")[e], getattr(experts, f"{attr}_zero")[e], xe.dtype
            )
        elif hasattr(experts, f"{attr}_scale"):
            w = dequantize_rows(w, getattr(experts, f"{attr}_scale")[e], xe.dtype)
        mats.append(w.to(xe.dtype))
    w1, w2, w3 = mats
    return F.linear(F.silu(F.linear(xe, w1)) * F.linear(xe, w3), w2)


# -- prefill: streaming a layer's experts to the GPU ------------------------------------------------


def _runs(global_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first expert id, first row, length) of each run of consecutive ids in `global_ids`."""
    runs = []
    for row, e in enumerate(global_ids):
        if runs and runs[-1][0] + runs[-1][2] == e:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((e, row, 1))
    return runs


class Stager:
    """Two staging slots on the GPU side, each one layer's whole stack of routed experts in the GPU's
    format; `fetch(layer)` returns the layer's filled slot (filling it now if it was not prefetched) and
    starts filling the other slot with the next offloaded layer on a side stream."""

    def __init__(self, layers: list[OffloadedExperts], device: torch.device, stats: OffloadStats, slots: int = 2):
        self.layers, self.device, self.stats = layers, device, stats
        self.slots: list[dict | None] = [None] * slots
        self.holder: list[OffloadedExperts | None] = [None] * slots
        self.filled: list = [None] * slots  # the copy stream's event when the slot's fill was queued
        self.used: list = [None] * slots  # the compute stream's event after the slot was last read
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _new_slot(self, layer: OffloadedExperts) -> dict:
        E = layer.num_experts
        slot = {}
        for attr in ("w1", "w2", "w3"):
            for suffix in ("", "_scale", "_zero"):
                source = _shape_source(layer, attr + suffix)
                if source is None:
                    continue
                shape, dtype = source
                slot[attr + suffix] = torch.empty((E, *shape), dtype=dtype, device=self.device)
        return slot

    def fetch(self, layer: OffloadedExperts) -> dict:
        index = self.holder.index(layer) if layer in self.holder else self._fill(layer, None)
        if self.filled[index] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.filled[index])
        following = self._next(layer)
        if following is not None and following not in self.holder:
            self._fill(following, avoid=index)
        slot = self.slots[index]
        scales = None
        if "w1_zero" in slot:
            scales = tuple((slot[f"{a}_scale"], slot[f"{a}_zero"]) for a in ("w1", "w2", "w3"))
        elif "w1_scale" in slot:
            scales = tuple(slot[f"{a}_scale"] for a in ("w1", "w2", "w3"))
        return {"w1": slot["w1"], "w2": slot["w2"], "w3": slot["w3"], "scales": scales}

    def done(self, layer: OffloadedExperts) -> None:
        """The compute stream has queued its reads of `layer`'s slot: a refill waits for them."""
        index = self.holder.index(layer)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self.used[index] = event

    def _next(self, layer: OffloadedExperts) -> OffloadedExperts | None:
        position = self.layers.index(layer)
        return self.layers[position + 1] if position + 1 < len(self.layers) else None

    def _fill(self, layer: OffloadedExperts, avoid: int | None) -> int:
        index = next(
            (i for i in range(len(self.slots)) if i != avoid and self.holder[i] is None),
            next(i for i in range(len(self.slots)) if i != avoid),
        )
        if self.slots[index] is None:
            self.slots[index] = self._new_slot(layer)
        self.holder[index] = layer
        stream = self.copy_stream
        if stream is not None:
            if self.used[index] is not None:
                stream.wait_event(self.used[index])
            with torch.cuda.stream(stream):
                self._copy(layer, self.slots[index])
                event = torch.cuda.Event()
                event.record(stream)
            self.filled[index] = event
        else:
            self._copy(layer, self.slots[index])
        return index

    def _copy(self, layer: OffloadedExperts, slot: dict) -> None:
        """Fill `slot` with the layer's stack: GPU rows device to device, RAM rows over PCIe (int4 tiles
        turned back into our layout on the GPU side)."""
        gpu_runs, ram_runs = _runs(layer.gpu_ids), _runs(layer.ram_ids)
        for name, target in slot.items():
            part = getattr(layer.on_gpu, name, None) if layer.gpu_ids else None
            for e, row, n in gpu_runs:
                target[e : e + n].copy_(part[row : row + n], non_blocking=True)
        tiles = getattr(layer.in_ram, "tiles", None)
        if tiles is not None:  # the relayout's temporaries are a few times the block: blocks of a few experts
            ram_runs = [
                (e + i, row + i, min(STREAM_BLOCK, n - i)) for e, row, n in ram_runs for i in range(0, n, STREAM_BLOCK)
            ]
        for e, row, n in ram_runs:
            if tiles is not None:
                for name, (stack, sz, _group, _) in tiles.items():
                    raw = stack[row : row + n].to(self.device, non_blocking=True)
                    raw_sz = sz[row : row + n].to(self.device, non_blocking=True)
                    self.stats.streamed_bytes += raw.numel() + raw_sz.numel() * raw_sz.element_size()
                    parts = JOINED[name]
                    codes = tiles_to_codes(raw, raw.shape[-2]).chunk(len(parts), dim=-2)
                    scale, zero = (t.chunk(len(parts), dim=-2) for t in tiles_to_scales(raw_sz))
                    for attr, c, sc, z in zip(parts, codes, scale, zero):
                        slot[attr][e : e + n].copy_(c)
                        slot[f"{attr}_scale"][e : e + n].copy_(sc)
                        slot[f"{attr}_zero"][e : e + n].copy_(z)
                continue
            for attr in ("w1", "w2", "w3"):
                for suffix in ("", "_scale", "_zero"):
                    if attr + suffix in slot:
                        source = getattr(layer.in_ram, attr + suffix)[row : row + n]
                        slot[attr + suffix][e : e + n].copy_(source, non_blocking=True)
                        self.stats.streamed_bytes += source.numel() * source.element_size()


def _shape_source(layer: OffloadedExperts, name: str):
    """(shape of one expert's tensor, dtype) for slot tensor `name`, from whichever half has it."""
    for part, ids in ((layer.on_gpu, layer.gpu_ids), (layer.in_ram, layer.ram_ids)):
        tensor = getattr(part, name, None)
        if ids and tensor is not None and tensor.numel():
            return tuple(tensor.shape[1:]), tensor.dtype
    tiles = getattr(layer.in_ram, "tiles", None)
    if tiles is not None:
        attr, _, suffix = name.partition("_")
        joined = next(j for j, parts in JOINED.items() if attr in parts)
        stack, sz, group, in_features = tiles[joined]
        O = sz.shape[-2] // len(JOINED[joined])
        if not suffix:
            return (O, in_features // 2), torch.uint8
        return (O, in_features // group), torch.bfloat16
    return None


class InPlaceDecode:
    """At decode (up to DECODE_MAX_TOKENS tokens), the chosen RAM experts computed by the GPU where they
    are, with no host step: a decode step is one CUDA graph.

    A layer's RAM experts live in pinned host memory as the CPU operator's int4 tiles (prepare_ram), and
    kernels/moe's `streamed_experts` reads the chosen ones over PCIe in place, each (token, expert) pair
    its expert. One token's few experts read that way cost the bus's latency more than its bandwidth,
    and the GPU would wait on them each layer, so for one token they are fetched ahead on a guess: the
    next offloaded layer's router is applied to this layer's input (on a trained model it names most of
    the next layer's choice: 83-90% on the demo model), and the RAM experts it picks are gathered into
    that layer's bank of DECODE_STREAM_SLOTS slots in GPU memory on a side stream, while the GPU works
    through this layer and the next one's attention. The next layer's true choice reads the experts it
    finds in its bank from there and only the others over the bus. Banks alternate over the offloaded
    layers; a bank is read only by the layer it was gathered for, in the same one-token step.

    `counts` (on the device, read with `take_counts`): experts read in place over the bus, gathered ahead,
    found in the bank."""

    def __init__(self, layers: list[OffloadedExperts], device: torch.device):
        self.device = device
        tiles = layers[0].in_ram.tiles
        self.banks = [
            {
                name: tuple(
                    torch.empty((DECODE_STREAM_SLOTS, *t.shape[1:]), dtype=t.dtype, device=device) for t in (stack, sz)
                )
                for name, (stack, sz, _group, _in) in tiles.items()
            }
            for _ in range(DECODE_STREAM_BANKS)
        ]
        # The RAM row of the layer each slot holds, -1 for none.
        self.held = [torch.full((DECODE_STREAM_SLOTS,), -1, dtype=torch.int64, device=device) for _ in self.banks]
        self.expert_bytes = sum(
            part[0].numel() * part.element_size() for pair in self.banks[0].values() for part in pair
        )
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Per bank, the gather queued for it and not yet read: (id of its layer, the side stream's event
        # after it, None off a GPU). A bank is read only by the layer it was gathered for, so that a
        # step cut short (an error between a gather and its reader) cannot lend one layer's experts to
        # another.
        self.pending: list[tuple[int, torch.cuda.Event | None] | None] = [None] * len(self.banks)

    def gather(self, layer: OffloadedExperts, rows: torch.Tensor) -> None:
        """Queue on the side stream the gather of `layer`'s RAM rows `rows` [k] (-1: an expert on the GPU)
        into its bank. The side stream first waits for the work queued so far: the guess, and the
        reads of the bank by the layer before (two offloaded layers back)."""
        from kimi_desk.kernels.moe import gather_rows

        bank, held = self.banks[layer.stream_bank], self.held[layer.stream_bank]
        rows = rows[:DECODE_STREAM_SLOTS]
        side = self.side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
            rows.record_stream(side)  # made on the main stream: not reused until the side stream is done
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for name, (stack, sz, _group, _in) in layer.in_ram.tiles.items():
                gather_rows(stack, rows, bank[name][0])
                gather_rows(sz, rows, bank[name][1])
            held.fill_(-1)
            held[: rows.shape[0]].copy_(rows)
            self.counts[1] += (rows >= 0).sum()
            event = None
            if side is not None:
                event = torch.cuda.Event()
                event.record(side)
        self.pending[layer.stream_bank] = (id(layer), event)

    def forward(self, layer: OffloadedExperts, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor):
        """x [N, D], the tokens' RAM rows [N, k] (-1: a GPU expert) and weights [N, k] -> the RAM experts'
        sums [N, D] float32: those found in the layer's bank read from it, the others from RAM over the
        bus (each (token, expert) pair reads its expert)."""
        from kimi_desk.kernels.moe import streamed_experts

        pending, self.pending[layer.stream_bank] = self.pending[layer.stream_bank], None
        # Only a one-token step gathers: a longer chunk finding an entry found one left by a step cut short.
        gathered = pending is not None and pending[0] == id(layer) and x.shape[0] == 1
        bank = None
        if gathered:
            if pending[1] is not None:
                torch.cuda.current_stream(self.device).wait_event(pending[1])
            slots = self.banks[layer.stream_bank]
            bank = (slots["w13"], slots["w2"], self.held[layer.stream_bank])
        tiles = layer.in_ram.tiles
        return streamed_experts(x, tiles["w13"][:2], tiles["w2"][:2], rows, weights, bank, self.counts)

    def forget(self) -> None:
        """Drop the gathers not yet read (a decode step's recording failed: their events belong to it)."""
        self.pending = [None] * len(self.banks)

    def take_counts(self) -> dict:
        """Experts read over the bus, gathered ahead and found in the bank since the last call (a host
        step: the GPU is waited for)."""
        over_bus, gathered, found = self.counts.tolist()
        self.counts.zero_()
        return {"read_in_place": over_bus, "gathered": gathered, "found": found}


@dataclass
class OffloadRuntime:
    """What the offloaded layers of one model share: the stats, the staging slots, decode in place (None
    without a GPU or with other than int4 experts), the decode limit, the event the host
    waits on for a layer's copies (None on the CPU), and the graph recorder's cut."""

    stats: OffloadStats
    stager: Stager | None = None
    in_place: "InPlaceDecode | None" = None
    decode_max_tokens: int = DECODE_MAX_TOKENS
    ready: torch.cuda.Event | None = None
    # Set by engine/cuda_graph.py while it records a decode step: ends the graph being recorded, to run
    # the given host step after each replay of it, and begins the next one.
    cut_recording: Callable[[Callable[[], None]], None] | None = None

    def host_step(self, action: Callable[[], None]) -> None:
        """Run `action` now, or between two recorded graphs of a decode step while one is recorded."""
        if self.cut_recording is None:
            action()
        else:
            self.cut_recording(action)


# -- building -----------------------------------------------------------------------------------------


def apply_placement(model: nn.Module, placement) -> None:
    """On a model built on the meta device (before quantize_structure): each MoE layer with experts in
    RAM gets an OffloadedExperts in place of its Experts."""
    config = model.config
    for i, layer in enumerate(model.model.layers):
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is None or i not in placement.gpu_experts:
            continue
        ram = placement.ram_experts(i)
        if not ram:
            continue
        # On the meta device like the rest: materialize gives both halves their devices (a half built
        # here on the CPU would keep its quantization sidecars there, out of the GPU kernels' reach).
        with torch.device("meta"):
            moe.experts = OffloadedExperts(
                config.num_experts, config.hidden_size, config.moe_intermediate_size, placement.gpu_experts[i], ram
            )
    model.placement = placement


def offloaded_layers(model: nn.Module) -> list[OffloadedExperts]:
    return [m for m in model.modules() if isinstance(m, OffloadedExperts)]


def finish_offload(model: nn.Module, decode_max_tokens: int = DECODE_MAX_TOKENS) -> OffloadRuntime | None:
    """After the weights are loaded: RAM halves to their CPU layout, the id maps and the staging slots
    on the model's device; the runtime is `model.offload` (None when nothing is in RAM)."""
    layers = offloaded_layers(model)
    if not layers:
        model.offload = None
        return None
    device = model.lm_head.weight.device
    stats = OffloadStats()
    runtime = OffloadRuntime(
        stats, decode_max_tokens=decode_max_tokens, ready=torch.cuda.Event() if device.type == "cuda" else None
    )
    for layer in layers:
        layer.finish(device, runtime)
    # Each offloaded layer's decode bank, and the next one's router for the guess (InPlaceDecode).
    routed = [moe for moe in model.modules() if isinstance(getattr(moe, "experts", None), OffloadedExperts)]
    for i, moe in enumerate(routed):
        moe.experts.stream_bank = i % DECODE_STREAM_BANKS
        if i + 1 < len(routed):
            moe.experts.next_layer = (routed[i + 1].experts, routed[i + 1].gate)
    runtime.stager = Stager(layers, device, stats)
    if device.type == "cuda" and all(getattr(layer.in_ram, "tiles", None) for layer in layers):
        runtime.in_place = InPlaceDecode(layers, device)
    model.offload = runtime
    return runtime


def expert_tensor(model: nn.Module, pname: str, index: int) -> tuple[str, int]:
    """The stacked parameter `pname` at expert `index` of the whole model -> the parameter and row that
    hold it under the model's placement (itself when the layer is not split)."""
    owner_name, _, attr = pname.rpartition(".")
    owner = model.get_submodule(owner_name)
    if not isinstance(owner, OffloadedExperts):
        return pname, index
    half, row = owner.row_of(index)
    return f"{owner_name}.{half}.{attr}", row


class StackedRows:
    """A split stack seen whole (the quantized cache's view of it): `shape`, `dtype`, `copy_` scatters
    the rows to the halves, `detach()` gathers them on the CPU."""

    def __init__(self, owner: OffloadedExperts, name: str):
        self.owner, self.name = owner, name
        gpu, ram = getattr(owner.on_gpu, name), getattr(owner.in_ram, name)
        part = gpu if gpu.numel() else ram
        self.shape = torch.Size((owner.num_experts, *part.shape[1:]))
        self.dtype = part.dtype

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def copy_(self, source: torch.Tensor) -> None:
        for half, ids in (("on_gpu", self.owner.gpu_ids), ("in_ram", self.owner.ram_ids)):
            if ids:
                target = getattr(getattr(self.owner, half), self.name)
                target.copy_(source[torch.tensor(ids)].to(target.device))

    def detach(self) -> torch.Tensor:
        whole = torch.empty(self.shape, dtype=self.dtype)
        for half, ids in (("on_gpu", self.owner.gpu_ids), ("in_ram", self.owner.ram_ids)):
            if ids:
                whole[torch.tensor(ids)] = getattr(getattr(self.owner, half), self.name).detach().cpu()
        return whole
