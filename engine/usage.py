"""How often each routed expert is chosen while documents are read, kept per model, so that a placement
which cannot hold every routed expert on the GPU holds the most used ones (engine/placement.py).

    usage = ExpertUsage.for_model(model)          # zeros [MoE layers, experts] int64 on the model's device
    with usage.counting(model):                   # each MoE layer adds its router's choices
        model(chunk, state)
    usage.tokens = usage.counted_tokens(top_k)    # once, at the end (it reads the counts: a host sync)
    add_usage(home, model.fingerprint, usage)     # summed into the model's usage file
    stored = read_usage(home, fingerprint, layers, num_experts, notice)   # None when there is none

Counting costs one index_add per MoE layer per forward call of more than SparseMoE.COUNT_MIN_TOKENS
tokens (prefill chunks; engine/model.py), on the device, with no host round trip; decode steps (and the
CUDA graphs recorded from them) are never counted, and with counting off the router only checks that
its counter is None.

One file per checkpoint, `<data folder>/usage/<checkpoint fingerprint>.safetensors`: the int64 counts
[MoE layers, experts] and, in its metadata, the version, the fingerprint, the MoE layers' indices and the
tokens counted. Written atomically under a lock (two processes reading at once both add theirs); a file
that does not check out (damaged, truncated, another layout) is ignored with one line, and the next
reading replaces it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

USAGE_VERSION = "1"
FOLDER = "usage"
_FINGERPRINT = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass
class ExpertUsage:
    """`counts[row, expert]`: how often MoE layer `layers[row]` chose `expert`; `tokens` the tokens
    behind them (each chooses `top_k` experts in every MoE layer)."""

    layers: tuple[int, ...]
    counts: torch.Tensor
    tokens: int = 0

    @classmethod
    def for_model(cls, model) -> ExpertUsage | None:
        """Zero counts for `model`'s MoE layers on its device; None when it has none."""
        config = model.config
        layers = tuple(config.moe_layers)
        if not layers:
            return None
        counts = torch.zeros(len(layers), config.num_experts, dtype=torch.int64, device=model.device)
        return cls(layers, counts)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[1]

    @contextmanager
    def counting(self, model) -> Iterator[None]:
        """Each MoE layer of `model` adds its router's choices to its row for the block."""
        moes = [model.get_submodule(f"model.layers.{i}.block_sparse_moe") for i in self.layers]
        for row, moe in enumerate(moes):
            moe.usage = self.counts[row]
        try:
            yield
        finally:
            for moe in moes:
                moe.usage = None

    def counted_tokens(self, top_k: int) -> int:
        """The tokens the counts hold: every token adds top_k to each layer's row."""
        return int(self.counts[0].sum()) // top_k

    def per_layer(self) -> dict[int, list[int]]:
        """{MoE layer: its counts per expert}: plan_placement's `usage`."""
        return dict(zip(self.layers, self.counts.cpu().tolist(), strict=True))


def usage_file(home: Path, fingerprint: str) -> Path | None:
    """Where the usage of the checkpoint with `fingerprint` lives under the data folder `home`; None for
    a model not loaded from a checkpoint (no fingerprint to key it by)."""
    if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
        return None
    return Path(home) / FOLDER / f"{fingerprint}.safetensors"


def read_usage(
    home: Path,
    fingerprint: str,
    layers,
    num_experts: int,
    notice: Callable[[str], None] = lambda line: None,
) -> ExpertUsage | None:
    """The stored usage of the checkpoint, on the CPU; None when there is none, or (said in one line
    through `notice`) when its file does not check out."""
    path = usage_file(home, fingerprint)
    if path is None or not path.is_file():
        return None
    try:
        return _parse(path, fingerprint, tuple(layers), num_experts)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it is only a hint
        why = " ".join(str(exc).split())[:120] or type(exc).__name__
        notice(f"expert usage file {path.name} is damaged ({why}); ignored, the next reading replaces it")
        return None


def _parse(path: Path, fingerprint: str, layers: tuple[int, ...], num_experts: int) -> ExpertUsage:
    from safetensors import safe_open

    from kimi_desk.engine.weights import read_header

    read_header(path)  # bounded and checked before anything is read from it
    with safe_open(path, "pt") as reader:
        metadata = reader.metadata() or {}
        names = set(reader.keys())
        counts = reader.get_tensor("counts") if names == {"counts"} else None
    if metadata.get("kimi_desk_usage") != USAGE_VERSION:
        raise ValueError(f"version {str(metadata.get('kimi_desk_usage'))[:20]!r}, not {USAGE_VERSION}")
    if metadata.get("fingerprint") != fingerprint:
        raise ValueError("another checkpoint's")
    if metadata.get("layers") != ",".join(map(str, layers)):
        raise ValueError("other MoE layers")
    if counts is None or counts.dtype != torch.int64 or tuple(counts.shape) != (len(layers), num_experts):
        raise ValueError("not counts of this model's experts")
    if bool((counts < 0).any()):
        raise ValueError("negative counts")
    tokens = metadata.get("tokens", "")
    if not tokens.isdigit():
        raise ValueError("no token count")
    return ExpertUsage(layers, counts, int(tokens))


def add_usage(
    home: Path,
    fingerprint: str,
    usage: ExpertUsage,
    notice: Callable[[str], None] = lambda line: None,
) -> ExpertUsage | None:
    """Add `usage` to the checkpoint's usage file (made if missing, replaced if damaged), atomically,
    under a lock; returns the sum written (None when the model has no fingerprint or nothing was
    counted)."""
    from safetensors.torch import save

    from kimi_desk.engine.atomic import atomic_write
    from kimi_desk.engine.errors import writing
    from kimi_desk.engine.file_lock import file_lock

    path = usage_file(home, fingerprint)
    if path is None or usage.tokens <= 0:
        return None
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.parent / f".{path.name}.lock"):
            stored = read_usage(home, fingerprint, usage.layers, usage.num_experts, notice)
            total = ExpertUsage(usage.layers, usage.counts.detach().cpu().clone(), usage.tokens)
            if stored is not None:
                total.counts += stored.counts
                total.tokens += stored.tokens
            metadata = {
                "kimi_desk_usage": USAGE_VERSION,
                "fingerprint": fingerprint,
                "layers": ",".join(map(str, usage.layers)),
                "tokens": str(total.tokens),
            }
            atomic_write(path, save({"counts": total.counts.contiguous()}, metadata=metadata))
    return total
