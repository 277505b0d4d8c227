"""The model's state after reading some tokens: explicit, fp32 where the math needs it, cheap to clone.

Per KDA layer: the recurrent matrix [B, H, K, V] (float32) and the short-conv window, the last
W - 1 inputs of the q, k and v convolutions [B, 3, H*K, W - 1] (model dtype). Per MLA layer: the
latent cache [B, T, kv_lora_rank + rope dim] (model dtype), append-only, so the cache at any earlier
position is a prefix of it. All sequences of a batch sit at the same position.

The model updates these tensors in place (the KDA matrices and windows) or writes into spare capacity
(the MLA caches), so their storage stays put from step to step: a CUDA graph recorded on one decode step
(engine/cuda_graph.py) replays on the same buffers. Only an MLA cache that outgrows its capacity moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KDAState:
    recurrent: torch.Tensor  # [B, H, K, V] float32
    conv: torch.Tensor  # [B, 3, P, W - 1]

    def clone(self) -> "KDAState":
        return KDAState(self.recurrent.clone(), self.conv.clone())

    @property
    def nbytes(self) -> int:
        return self.recurrent.nbytes + self.conv.nbytes


class MLACache:
    """A growing latent cache. Storage grows geometrically so that appending one token at a time costs
    amortised O(1) copies; `latents` is a view of the filled part, `buffer` the whole storage.

    While engine/cuda_graph.py records a decode step, `device_length` holds the length as a one-element
    int64 tensor on the cache's device: the recorded step writes its latents at that position and
    attention reads its range from it, so that the replayed graph follows the cache as it fills (a
    replay cannot see host integers). The recorder advances `length` on the host after each replay.
    """

    def __init__(self, batch_size: int, width: int, dtype: torch.dtype, device, capacity: int = 256):
        self._buffer = torch.empty(batch_size, capacity, width, dtype=dtype, device=device)
        self.length = 0
        self.device_length: torch.Tensor | None = None

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
        """Make room for `total` tokens, so that appends up to there keep the storage in place."""
        if total > self.capacity:
            grown = torch.empty(
                self._buffer.shape[0], total, self._buffer.shape[2], dtype=self._buffer.dtype,
                device=self._buffer.device,
            )
            grown[:, : self.length] = self.latents
            self._buffer = grown

    def append(self, latents: torch.Tensor) -> torch.Tensor:
        """Append [B, T, width]; returns every cached latent, new ones included (while a decode step is
        recorded: the whole buffer, whose filled length only the device knows)."""
        if self.device_length is not None:
            positions = self.device_length + torch.arange(latents.shape[1], device=latents.device)
            self._buffer.index_copy_(1, positions, latents)
            return self._buffer
        end = self.length + latents.shape[1]
        if end > self.capacity:
            self.reserve(max(end, 2 * self.capacity))
        self._buffer[:, self.length : end] = latents
        self.length = end
        return self.latents

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def clone(self) -> "MLACache":
        copy = MLACache.__new__(MLACache)
        copy._buffer = self._buffer[:, : max(self.length, 1)].clone()
        copy.length = self.length
        copy.device_length = None
        return copy

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
