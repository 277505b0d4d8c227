"""One batch-1 decode step on the CPU recorded once and replayed for every token, without the model's
Python code.

A CPU decode step is some seventy calls of our C kernels (kernels/native.py) and a few dozen small
PyTorch operations between them. Run through the model's modules, the Python around them costs more
than the arithmetic: two thirds of a step of the demo model on two cores. Recorded once as the list of
what computes, the step replays from that list:

  - every C kernel call, made again with the same arguments (kernels/native.py `recording`): pointers
    into tensors that stay put (the weights, the state updated in place, the step's own activations,
    which the recording keeps alive);
  - every PyTorch operation that computes, seen by a dispatch mode below autograd: run again on the
    same input tensors, its result copied into the storage of the output it first made, which later
    operations and kernels read; an in-place one runs again as it is; views and fresh uninitialised
    tensors compute nothing and are left out.

What makes a step replayable is what makes the GPU's CUDA graph replayable (engine/cuda_graph.py): the
state's tensors keep their storage, the MLA caches write into spare capacity, and the one number that
changes between steps, the caches' length, is read from memory: while the step is recorded each
cache's `device_length` is this decoder's `length` tensor, which is set before every replay. A step
that asks for a tensor's value on the host (`.item()`, a shape that depends on values) or draws random
numbers cannot be replayed: the recording stops there and the decoder runs the model's modules from
then on, with the same results.

The decoder keeps the counters: after each step it advances state.position and every cache's length,
so between steps the model can use the state as usual. The step is recorded again when a cache is full
(it then grows with headroom, as on the GPU) or the state's tensors were replaced; the recorded run is
itself a step (unlike a CUDA graph's capture, it computes).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_desk.engine.cuda_graph import give_full_caches_room
from kimi_desk.engine.state import KDAState, MLACache, ModelState
from kimi_desk.kernels import native, use_triton

# Operations whose result a replay cannot reproduce from the same inputs: a value read on the host (the
# Python code then chose by it), a shape that depends on values, random numbers.
_NOT_REPLAYABLE_TAGS = {
    torch.Tag.data_dependent_output,
    torch.Tag.dynamic_output_shape,
    torch.Tag.nondeterministic_seeded,
}
_HOST_READS = {torch.ops.aten.is_nonzero.default}
# Operations that make a tensor without computing its values.
_UNINITIALISED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class NotReplayable(Exception):
    """The step did something a replay could not repeat."""


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _integer_indexing(func, args) -> bool:
    """Indexing by integer tensors (an embedding's rows): its shape is the indices', whatever their values
    (the tag that says otherwise is for boolean masks)."""
    return func is torch.ops.aten.index.Tensor and all(
        index is None or not (index.dtype == torch.bool or index.dtype == torch.uint8) for index in args[1]
    )


class _Recomputed:
    """A functional operation run again on its inputs, the result copied into its first outputs."""

    __slots__ = ("operation", "outputs")

    def __init__(self, func, args, kwargs, outputs: list[torch.Tensor]):
        self.operation = functools.partial(func, *args, **kwargs)
        self.outputs = outputs

    def __call__(self) -> None:
        result = self.operation()
        fresh = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        for output, value in zip(self.outputs, fresh):
            output.copy_(value)


# Copies (a dtype's conversion among them): replayed as one copy into the recorded output.
_COPIES = {
    torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
}


def _replay_of(func, args, kwargs, outputs: list[torch.Tensor]):
    if func in _COPIES and len(outputs) == 1:
        return functools.partial(outputs[0].copy_, args[0])
    return _Recomputed(func, args, kwargs, outputs)


class _Recorder(TorchDispatchMode):
    """Notes each computing operation in `steps` (in order with the C kernels' calls, which
    native.recording appends to the same list) and keeps every tensor made alive in `kept`."""

    def __init__(self, steps: list, kept: list):
        super().__init__()
        self.steps, self.kept = steps, kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS or (_NOT_REPLAYABLE_TAGS.intersection(func.tags) and not _integer_indexing(func, args)):
            raise NotReplayable(f"{func} (a value read on the host, a shape from values, or random numbers)")
        result = func(*args, **kwargs)
        outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
        self.kept.extend(outputs)
        if func._schema.is_mutable:
            self.steps.append(functools.partial(func, *args, **kwargs))
        elif outputs and func.overloadpacket.__name__ not in _UNINITIALISED:
            inputs = _storages((args, kwargs))
            if not all(output.untyped_storage().data_ptr() in inputs for output in outputs):  # not a view
                self.steps.append(_replay_of(func, args, kwargs, outputs))
        return result


class _HostReads(TorchFunctionMode):
    """Refuses the tensor methods that hand values to Python without a dispatched operation."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _VALUES_TO_PYTHON:
            raise NotReplayable(f"Tensor.{func.__name__} (a value read on the host)")
        return func(*args, **(kwargs or {}))


_VALUES_TO_PYTHON = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}


class CpuDecoder:
    """Replays one recorded decode step of `model` on `state` (batch 1, on the CPU). Holds the state
    weakly.

        decoder = CpuDecoder(model, state)
        logits = decoder.step(token)   # [vocab] float32, a buffer the next step overwrites
    """

    def __init__(self, model, state: ModelState):
        if state.batch_size != 1:
            raise ValueError(f"replayed decode runs on a batch of 1, the state has {state.batch_size}")
        self.model = model
        self._state = weakref.ref(state)
        self.token = torch.zeros(1, 1, dtype=torch.long)
        self.length = torch.zeros(1, dtype=torch.long)
        self.steps: list = []
        self.logits: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []
        self._prepared_for: tuple = ()
        self.recordings = 0
        # Why the step runs through the model's modules instead (None while it replays).
        self.not_replayable: str | None = None

    @property
    def state(self) -> ModelState | None:
        return self._state()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; returns the logits after it, [vocab] float32 (overwritten by the next step)."""
        state = self.state
        self.token.fill_(int(token))
        if self.not_replayable is None:
            caches = [layer for layer in state.layers if isinstance(layer, MLACache)]
            self.length.fill_(caches[0].length if caches else 0)
            if self._storage(state) == self._prepared_for and all(c.length < c.capacity for c in caches):
                for step in self.steps:
                    step()
                self._advance(state, caches)
                return self.logits
            if self._record(state, caches):  # the recorded run took the step
                self._advance(state, caches)
                return self.logits
        return self.model(self.token, state, last_only=True)[0, -1]

    @staticmethod
    def _advance(state: ModelState, caches: list[MLACache]) -> None:
        state.position += 1
        for cache in caches:
            cache.length += 1

    def _record(self, state: ModelState, caches: list[MLACache]) -> bool:
        """Take the step once under the recorder (full caches get room first). True where it recorded;
        else the state is put back as it was and `not_replayable` says why."""
        self.steps, self.logits, self._kept = [], None, []
        give_full_caches_room(caches)
        kda_states = [layer for layer in state.layers if isinstance(layer, KDAState)]
        saved = [(layer.recurrent.clone(), layer.conv.clone()) for layer in kda_states]
        position = state.position
        steps, kept = [], []
        for cache in caches:
            cache.device_length = self.length
        try:
            with native.recording(steps), _HostReads(), _Recorder(steps, kept):
                logits = self.model(self.token, state, last_only=True)
        except Exception as error:  # the model's own steps then meet a real error again, and raise it
            if isinstance(error, NotReplayable):
                self.not_replayable = str(error)
            else:
                self.not_replayable = f"recording failed: {type(error).__name__}: {error}"
            for layer, (recurrent, conv) in zip(kda_states, saved):
                layer.recurrent.copy_(recurrent)
                layer.conv.copy_(conv)
            return False
        finally:
            for cache in caches:
                cache.device_length = None
            state.position = position
        self.steps, self._kept, self.logits = steps, kept, logits[0, -1]
        self._prepared_for = self._storage(state)
        self.recordings += 1
        return True

    @staticmethod
    def _storage(state: ModelState) -> tuple:
        """Where the state's tensors live: a recording is valid while this is unchanged."""
        return tuple(
            (layer.recurrent.data_ptr(), layer.conv.data_ptr())
            if isinstance(layer, KDAState)
            else layer.buffer.data_ptr()
            for layer in state.layers
        )


def cpu_decoder(model, state: ModelState) -> CpuDecoder | None:
    """A replaying decoder for `state` where the model runs on the CPU with a batch of 1 through PyTorch
    and our C kernels; else None. (Triton's interpreter, which the tests send CPU tensors to, reads them
    through NumPy, out of a recording's sight.)"""
    if model.device.type != "cpu" or state.batch_size != 1 or use_triton(model.lm_head.weight):
        return None
    return CpuDecoder(model, state)
