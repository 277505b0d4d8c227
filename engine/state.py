"""The model's state after reading some tokens: explicit, fp32 where the math needs it, cheap to clone.

Per KDA layer: the recurrent matrix [B, H, K, V] (float32) and the short-conv window, the last
W - 1 inputs of the q, k and v convolutions [B, 3, H*K, W - 1] (model dtype). Per MLA layer: the
latent cache [B, T, kv_lora_rank + rope dim] (model dtype), append-only, so the cache at any earlier
position is a prefix of it. All sequences of a batch sit at the same position.

The model updates these tensors in place (the KDA matrices and windows) or writes into spare capacity
(the MLA caches), so their storage stays put from step to step: a CUDA graph recorded on one decode step
(engine/cuda_graph.py) replays on the same buffers. Only an MLA cache that outgrows its capacity moves;
and while a decoder looks ahead, each KDA layer's tensors alternate between two sets of buffers
(`KDAState.written_to`), one recording for each.

A conversation continues the document's state without copying its cache: `ModelState.continuation()`
copies the small KDA part and gives each MLA layer a cache over the document's own storage, which
reads the document's rows in place and appends its own after them, into the storage's spare capacity.
The document's rows are never written again. Every continuation of one state writes to the same rows
past the document, so one continuation at a time is live (engine/session.py keeps that rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KDAState:
    recurrent: torch.Tensor  # [B, H, K, V] float32
    conv: torch.Tensor  # [B, 3, P, W - 1]
    # Where a step writes the layer's new state instead of in place, the old one kept (engine/cuda_graph.py
    # looking ahead: a step taken back is then a swap of buffers, not a copy); None: in place.
    written_to: KDAState | None = None

    def clone(self) -> "KDAState":
        return KDAState(self.recurrent.clone(), self.conv.clone())

    @property
    def nbytes(self) -> int:
        return self.recurrent.nbytes + self.conv.nbytes


class _Storage:
    """The tensor behind one or more MLA caches: a document's cache and its continuations hold the same
    _Storage, so that when a continuation outgrows it, the document's cache follows to the new tensor
    (one buffer in memory, never two)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class MLACache:
    """A growing latent cache. Storage grows geometrically so that appending one token at a time costs
    amortised O(1) copies; `latents` is a view of the filled part, `buffer` the whole storage.

    While engine/cuda_graph.py records a decode step, `device_length` holds the length as a one-element
    int64 tensor on the cache's device: the recorded step writes its latents at that position and
    attention reads its range from it, so that the replayed graph follows the cache as it fills (a
    replay cannot see host integers). The recorder advances `length` on the host after each replay.

    A continuation (`continuation()`) shares the storage; its first `shared` rows are the other cache's
    and are never written or truncated away. It grows by its own rows, not by the shared ones: a thread
    after a 1M-token document asks for room for its own tokens, not for another million.
    """

    def __init__(self, batch_size: int, width: int, dtype: torch.dtype, device, capacity: int = 256):
        self._storage = _Storage(torch.empty(batch_size, capacity, width, dtype=dtype, device=device))
        self.length = 0
        self.shared = 0
        self.device_length: torch.Tensor | None = None

    @property
    def _buffer(self) -> torch.Tensor:
        return self._storage.tensor

    @property
    def latents(self) -> torch.Tensor:  # [B, length, width]
        return self._buffer[:, : self.length]

    @property
    def buffer(self) -> torch.Tensor:  # [B, capacity, width]; rows from `length` on are not filled
        return self._buffer

    @property
    def capacity(self) -> int:
        return self._buffer.shape[1]

    @property
    def start(self) -> int | torch.Tensor:
        """Where the next latents go: `length`, or `device_length` while a decode step is recorded."""
        return self.length if self.device_length is None else self.device_length

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens, so that appends up to there keep the storage in place. Caches
        sharing the storage move with it (their rows up to this cache's length come along)."""
        if total > self.capacity:
            grown = torch.empty(
                self._buffer.shape[0],
                total,
                self._buffer.shape[2],
                dtype=self._buffer.dtype,
                device=self._buffer.device,
            )
            grown[:, : self.length] = self.latents
            self._storage.tensor = grown

    def append(self, latents: torch.Tensor) -> torch.Tensor:
        """Append [B, T, width]; returns every cached latent, new ones included (while a decode step is
        recorded: the whole buffer, whose filled length only the device knows)."""

        def write(buffer, start):
            if isinstance(start, torch.Tensor):
                rows = start + torch.arange(latents.shape[1], device=latents.device)
                buffer.index_copy_(1, rows, latents.to(buffer.dtype))
            else:
                buffer[:, start : start + latents.shape[1]] = latents

        return self.append_written(latents.shape[1], write)

    def append_written(self, tokens: int, write) -> torch.Tensor:
        """`append` for `tokens` new rows that `write(buffer, start)` puts into the buffer itself at rows
        start .. start + tokens (a kernel that computes them there); start is `self.start`."""
        if self.device_length is not None:
            write(self._buffer, self.device_length)
            return self._buffer
        end = self.length + tokens
        if end > self.capacity:
            own = end - self.shared
            self.reserve(max(end, 2 * self.capacity) if not self.shared else end + max(own, 256))
        write(self._buffer, self.length)
        self.length = end
        return self.latents

    def truncate(self, length: int) -> None:
        if not self.shared <= length <= self.length:
            raise ValueError(
                f"cannot truncate a cache of {self.length} tokens ({self.shared} of them shared) to {length}"
            )
        self.length = length

    def clone(self) -> "MLACache":
        """An independent copy of every row, shared ones included."""
        copy = MLACache.__new__(MLACache)
        copy._storage = _Storage(self._buffer[:, : max(self.length, 1)].clone())
        copy.length = self.length
        copy.shared = 0
        copy.device_length = None
        return copy

    def continuation(self) -> "MLACache":
        """A cache that reads this one's rows where they are and appends after them into the same
        storage. Appends overwrite what another continuation of this cache wrote there."""
        view = MLACache.__new__(MLACache)
        view._storage = self._storage
        view.length = view.shared = self.length
        view.device_length = None
        return view

    def shares_rows_with(self, other: "MLACache") -> bool:
        return self._storage is other._storage

    @property
    def nbytes(self) -> int:
        return self.latents.nbytes


class ModelState:
    """Everything the model needs to continue after `position` tokens."""

    def __init__(self, layers: list, position: int = 0):
        self.layers = layers  # KDAState or MLACache, one per decoder layer
        self.position = position

    def clone(self) -> "ModelState":
        return ModelState([layer.clone() for layer in self.layers], self.position)

    def continuation(self) -> "ModelState":
        """A state that continues this one: the KDA part copied, the MLA caches continued in place (see
        the module doc). This state must not advance while the continuation is in use."""
        layers = [layer.clone() if isinstance(layer, KDAState) else layer.continuation() for layer in self.layers]
        return ModelState(layers, self.position)

    def mark(self) -> "StateMark":
        """What `restore` needs to bring the state back to here: a copy of the KDA part (small) and the
        MLA caches' lengths (their rows are append-only, so the rows up to here stay as they are)."""
        return StateMark(
            self.position,
            [layer.clone() if isinstance(layer, KDAState) else layer.length for layer in self.layers],
        )

    def restore(self, mark: "StateMark") -> None:
        """Back to where `mark` was taken, in place (the tensors keep their storage)."""
        for layer, saved in zip(self.layers, mark.layers):
            if isinstance(layer, KDAState):
                layer.recurrent.copy_(saved.recurrent)
                layer.conv.copy_(saved.conv)
            else:
                layer.truncate(saved)
        self.position = mark.position

    def reserve(self, total: int) -> None:
        """Room in every MLA cache for `total` tokens, so that appends up to there never move the rows."""
        for layer in self.layers:
            if isinstance(layer, MLACache):
                layer.reserve(total)

    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return (first.recurrent if isinstance(first, KDAState) else first._buffer).shape[0]

    @property
    def kda_nbytes(self) -> int:
        """The constant-size part: recurrent matrices and conv windows."""
        return sum(layer.nbytes for layer in self.layers if isinstance(layer, KDAState))

    @property
    def mla_nbytes(self) -> int:
        """The part that grows with position: the latent caches."""
        return sum(layer.nbytes for layer in self.layers if isinstance(layer, MLACache))


@dataclass
class StateMark:
    """A place in a state's history to go back to (ModelState.mark): per layer a KDA copy or an MLA length."""

    position: int
    layers: list
