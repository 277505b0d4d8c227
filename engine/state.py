"""The model's state after reading some tokens: explicit, fp32 where the math needs it, cheap to clone.

Per KDA layer: the recurrent matrix [B, H, K, V] (float32) and the short-conv window, the last
W - 1 inputs of the q, k and v convolutions [B, 3, H*K, W - 1] (model dtype). Per MLA layer: the
latent cache [B, T, kv_lora_rank + rope dim] (model dtype), append-only, so the cache at any earlier
position is a prefix of it. All sequences of a batch sit at the same position.
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
    amortised O(1) copies; `latents` is a view of the filled part."""

    def __init__(self, batch_size: int, width: int, dtype: torch.dtype, device, capacity: int = 256):
        self._buffer = torch.empty(batch_size, capacity, width, dtype=dtype, device=device)
        self.length = 0

    @property
    def latents(self) -> torch.Tensor:  # [B, length, width]
        return self._buffer[:, : self.length]

    def append(self, latents: torch.Tensor) -> torch.Tensor:
        """Append [B, T, width]; returns every cached latent, new ones included."""
        end = self.length + latents.shape[1]
        if end > self._buffer.shape[1]:
            grown = torch.empty(
                self._buffer.shape[0], max(end, 2 * self._buffer.shape[1]), self._buffer.shape[2],
                dtype=self._buffer.dtype, device=self._buffer.device,
            )
            grown[:, : self.length] = self.latents
            self._buffer = grown
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
