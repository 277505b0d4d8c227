"""One batch-1 decode step recorded as a CUDA graph and replayed for every token.

A decode step is a few hundred small kernels. Launched one by one from Python, the host sets the pace
(BENCHMARKS.md, "Whole model"); recorded once as a CUDA graph, the step replays with one launch.

    decoder = graph_decoder(model, state)
    logits = decoder.step(token)      # [vocab] float32 on the GPU; state advanced by one token
    token = decoder.greedy_token      # [1, 1] int64 on the GPU: argmax of logits[:vocab_size]
    decoder.use_sampling(Sampling(0.7, top_p=0.9), seen)  # the next token chosen inside the step:
    decoder.step(token, uniform=0.42); decoder.next_token  # the host writes the draw, reads the id

A replayed graph runs the recorded kernels on the recorded addresses with the recorded arguments. What
makes the step replayable:
  - every buffer it touches keeps its storage: the KDA states are updated in place, the MLA caches
    write into spare capacity (state.py), the input token and the outputs belong to the decoder;
  - nothing inside asks the host anything (the MoE takes a sync-free GEMV, kernels/moe), except where
    the host has work of its own: with routed experts in RAM that the GPU cannot read in place
    (engine/offload.py: int8 or bf16 experts) each such MoE layer hands its tokens to the CPU and adds
    what the CPU returns. There the recording is cut: the step is a
    list of pieces, each a graph and the host's step after it (the CPU's experts, through host buffers
    at fixed addresses), replayed in order; the pieces share one memory pool, which is safe because they
    replay in the order they were recorded, one after another;
  - the one number that changes between steps, the cache length, lives in device memory: while the
    step is recorded, each MLA cache's `device_length` is this decoder's `length` tensor, which the
    host refreshes before every replay; the cache write and the MLA kernel read it from there.

The host keeps the counters: after each replay it advances state.position and every cache's length,
so between replays the eager model can use the state as usual (the next turn's prefill, a snapshot).
The step is recorded again when a cache is full (it then grows with headroom, so this happens once
every few thousand tokens) and when the state's tensors were replaced (a restored snapshot).

Looking ahead (`use_lookahead`): the step also writes its choice into its own input and advances the
device's cache length, so `step_own_choice` replays the next step before the host has read the choice
(`choice` reads a step's choice when asked, through pinned memory): the GPU never waits for the host
between tokens. The host learns a token one step late; when that token is one the caller does not feed
(a stop token, a cancelled reply), `undo` takes the extra step back: the caches' rows are append-only,
and the KDA states alternate between two sets of buffers, each step reading one set and writing the
other (`KDAState.written_to`), so taking a step back is swapping the sets again, with no copy. The step
is recorded once for each direction, each recording with its own outputs, and the two are replayed in
turn. (The penalty's marks are copied in afresh for every reply: `use_sampling`.)
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from contextlib import contextmanager, suppress

import torch

from kimi_desk.engine.state import KDAState, MLACache, ModelState

# Room a full MLA cache grows by before the step is recorded again: at least this many tokens, or an
# eighth of the cache, so that recording (tens of milliseconds) stays rare beside the steps between.
CACHE_HEADROOM_TOKENS = 4096


def give_full_caches_room(caches: list[MLACache]) -> None:
    """Before a decode step is recorded (here, and on the CPU in cpu_replay.py): every full MLA cache
    grows by CACHE_HEADROOM_TOKENS or an eighth of its own rows (a thread's, not the document's it
    continues), whichever is more. The caches must hold one length."""
    if len({cache.length for cache in caches}) > 1:
        raise ValueError("the MLA caches hold different numbers of tokens")
    for cache in caches:
        if cache.length >= cache.capacity:
            cache.reserve(cache.length + max(CACHE_HEADROOM_TOKENS, (cache.length - cache.shared) // 8))


# Eager runs before recording: they compile the Triton kernels and settle the allocator.
WARMUP_STEPS = 2


class GraphDecoder:
    """Replays one recorded decode step of `model` on `state` (batch 1). Holds the state weakly.

    With use_cuda_graph=False every step runs the same code eagerly, the cache lengths read from device
    memory as in a recording: how the CPU tests check this path (under Triton's interpreter).
    """

    def __init__(self, model, state: ModelState, vocab_size: int | None = None, use_cuda_graph: bool = True):
        if state.batch_size != 1:
            raise ValueError(f"graph decode runs on a batch of 1, the state has {state.batch_size}")
        self.model = model
        self.vocab_size = vocab_size or model.config.vocab_size
        self.use_cuda_graph = use_cuda_graph
        self._state = weakref.ref(state)
        device = model.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.greedy_token: torch.Tensor | None = None
        # The choice of the next token, recorded with the step (use_sampling): its rule, the draw the host
        # writes before each replay, the repetition penalty's marks, and the chosen id.
        self.sampling = None
        self.uniform = torch.zeros(1, dtype=torch.float64, device=device)
        self.seen: torch.Tensor | None = None
        self.next_token: torch.Tensor | None = None
        # Looking ahead: per KDA layer the buffers the state is not in now (the next step writes there),
        # the recording for those buffers (its pieces and outputs), and each step's choice on its way
        # to the host (two slots in pinned memory, each with the event that says it arrived).
        self.lookahead = False
        self._other_buffers: list[KDAState] = []
        self._other_recording: tuple = ()
        on_gpu = device.type == "cuda"
        self._choices = torch.zeros(2, dtype=torch.long, pin_memory=on_gpu)
        self._arrived = [torch.cuda.Event() for _ in range(2)] if on_gpu else None
        self._steps = 0
        # The recorded step: graphs, each with the host's step to run after it (None after the last).
        self.pieces: list[tuple[torch.cuda.CUDAGraph, Callable[[], None] | None]] = []
        self._prepared_for: tuple = ()
        self.recordings = 0

    @property
    def state(self) -> ModelState | None:
        return self._state()

    def use_sampling(self, sampling, seen: torch.Tensor | None = None) -> None:
        """Choose `next_token` by `sampling` (engine/generate.py's Sampling) in every step from now on,
        with the repetition penalty's marks copied from `seen` ([vocab] bool; each step then marks the
        token it feeds). A rule other than the recorded one is recorded again at the next step."""
        import dataclasses

        sampling = dataclasses.replace(sampling, seed=None)  # the draws come from the host
        penalty = sampling.repetition_penalty != 1 and seen is not None
        if sampling != self.sampling or penalty != (self.seen is not None):
            self.sampling = sampling
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.token.device) if penalty else None
            self._prepared_for = ()
        if self.seen is not None:
            self.seen.copy_(seen[: self.vocab_size])

    def use_lookahead(self, on: bool) -> None:
        """Record the step with or without what looking ahead needs (module docstring)."""
        if on != self.lookahead:
            self.lookahead = on
            self._prepared_for = ()

    @torch.inference_mode()
    def step(self, token: int | torch.Tensor, uniform: float | None = None) -> torch.Tensor:
        """Feed one token (an int, or a one-element int64 tensor on the model's device such as
        `greedy_token`), with `uniform` the draw of the next token's choice when it is sampled; returns
        the logits after it, [vocab] float32, a buffer the next step overwrites (`next_token` holds the
        choice)."""
        state = self.state
        caches = self._caches(state)
        # The inputs first: a recording's warm-up runs on them (and a token given as the last recording's
        # output lives in memory a new recording may reuse).
        if isinstance(token, torch.Tensor):
            self.token.copy_(token.view(1, 1))
        else:
            self.token.fill_(int(token))
        self.length.fill_(caches[0].length if caches else 0)
        if uniform is not None:
            self.uniform.fill_(uniform)
        return self._replay(state, caches)

    @torch.inference_mode()
    def step_own_choice(self, uniform: float | None = None) -> int:
        """Feed the token the last step chose, already in the step's input (looking ahead, after a step),
        without reading it; `uniform` as in `step`. Returns a number for `choice`."""
        assert self.lookahead and self._steps, "step_own_choice follows a step recorded with lookahead"
        state = self.state
        caches = self._caches(state)
        if uniform is not None:
            self.uniform.fill_(uniform)
        self._replay(state, caches)
        return self._steps - 1

    def choice(self, step: int) -> int:
        """The token chosen by step number `step` (`last_step` after `step`, or what `step_own_choice`
        returned), one of the last two: waits for that step only."""
        assert self._steps - 2 <= step < self._steps
        if self._arrived is not None:
            self._arrived[step % 2].synchronize()
        return int(self._choices[step % 2])

    @property
    def last_step(self) -> int:
        return self._steps - 1

    @torch.inference_mode()
    def undo(self) -> None:
        """Take the last step back (looking ahead): the state as before it, its token not fed."""
        state = self.state
        caches = self._caches(state)
        self._swap_buffers(state)
        state.position -= 1
        for cache in caches:
            cache.truncate(cache.length - 1)
        self.length.fill_(caches[0].length if caches else 0)
        self._steps -= 1

    def _replay(self, state: ModelState, caches: list[MLACache]) -> torch.Tensor:
        if self._storage(state) != self._prepared_for or any(cache.length >= cache.capacity for cache in caches):
            self._prepare(state, caches)
        if self.use_cuda_graph:
            for graph, host_step in self.pieces:
                graph.replay()
                if host_step is not None:
                    host_step()
        else:
            with self._lengths_on_device(state, caches):
                self._run(state)
        state.position += 1
        for cache in caches:
            cache.length += 1
        logits = self.logits
        if self.lookahead:
            slot = self._steps % 2
            self._choices[slot : slot + 1].copy_(self.next_token.view(1), non_blocking=True)
            if self._arrived is not None:
                self._arrived[slot].record()
            self._swap_buffers(state)
        self._steps += 1
        return logits

    def _swap_kda_buffers(self, state: ModelState) -> None:
        for layer, other in zip(self._kda_layers(state), self._other_buffers):
            layer.recurrent, other.recurrent = other.recurrent, layer.recurrent
            layer.conv, other.conv = other.conv, layer.conv

    def _swap_buffers(self, state: ModelState) -> None:
        """Looking ahead: the state into the other set of KDA buffers (the one the last step wrote, or
        read when taking it back), and the recording for that set's next step in use."""
        self._swap_kda_buffers(state)
        if self._other_recording:
            mine = (self.pieces, self.logits, self.greedy_token, self.next_token)
            self.pieces, self.logits, self.greedy_token, self.next_token = self._other_recording
            self._other_recording = mine

    @staticmethod
    def _kda_layers(state: ModelState) -> list[KDAState]:
        return [layer for layer in state.layers if isinstance(layer, KDAState)]

    @staticmethod
    def _caches(state: ModelState) -> list[MLACache]:
        return [layer for layer in state.layers if isinstance(layer, MLACache)]

    def _run(self, state: ModelState) -> None:
        from kimi_desk.engine.generate import choose_token

        kda_layers = self._kda_layers(state) if self.lookahead else []
        for layer, other in zip(kda_layers, self._other_buffers):
            layer.written_to = other
        try:
            self.logits = self.model(self.token, state, last_only=True)[0, -1]  # [vocab] float32
        finally:
            for layer in kda_layers:
                layer.written_to = None
        self.greedy_token = self.logits[: self.vocab_size].argmax().view(1, 1)
        if self.seen is not None:
            self.seen.index_fill_(0, self.token.view(1), True)
        if self.sampling is None or (self.sampling.greedy and self.seen is None):
            self.next_token = self.greedy_token.view(1)
        else:
            self.next_token = choose_token(self.logits[: self.vocab_size], self.sampling, self.uniform, self.seen)
        if self.lookahead:  # the next step's input: this step's choice, one row further in the caches
            self.token.copy_(self.next_token.view(1, 1))
            self.length.add_(1)

    @contextmanager
    def _lengths_on_device(self, state: ModelState, caches: list[MLACache]):
        """The caches read their length from `self.length`; the host counters stay as they were (the
        model's forward advances state.position, which the caller does after the step instead)."""
        position = state.position
        for cache in caches:
            cache.device_length = self.length
        try:
            yield
        finally:
            for cache in caches:
                cache.device_length = None
            state.position = position

    def _prepare(self, state: ModelState, caches: list[MLACache]) -> None:
        """Give full caches room, then record the step (when using a graph)."""
        # Free the previous recording's memory before making another.
        self.pieces, self.logits, self.greedy_token, self.next_token = [], None, None, None
        self._other_recording = ()
        give_full_caches_room(caches)
        self._other_buffers = [
            KDAState(torch.empty_like(layer.recurrent), torch.empty_like(layer.conv))
            for layer in (self._kda_layers(state) if self.lookahead else [])
        ]
        if self.use_cuda_graph:
            self._record(state, caches)
        self._prepared_for = self._storage(state)

    def _record(self, state: ModelState, caches: list[MLACache]) -> None:
        kda_states = self._kda_layers(state)
        saved = [(layer.recurrent.clone(), layer.conv.clone()) for layer in kda_states]
        seen = None if self.seen is None else self.seen.clone()
        token = self.token.clone()  # looking ahead, the warm-up writes its choice there
        self.length.fill_(caches[0].length if caches else 0)
        device = self.token.device
        with self._lengths_on_device(state, caches):
            # The warm-up writes the next cache row (rewritten by the first replay) and advances the
            # KDA states, which are put back before recording; recording itself runs nothing.
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._run(state)
            current.wait_stream(side)
            for layer, (recurrent, conv) in zip(kda_states, saved):
                layer.recurrent.copy_(recurrent)
                layer.conv.copy_(conv)
            if seen is not None:  # the warm-up marked the token it fed, which the first replay feeds again
                self.seen.copy_(seen)
            self.token.copy_(token)
            self.length.fill_(caches[0].length if caches else 0)
            self.pieces = self._record_pieces(state, side)
            if self.lookahead:  # the step from the other set of buffers, recorded with its own outputs
                first = (self.pieces, self.logits, self.greedy_token, self.next_token)
                self._swap_kda_buffers(state)
                try:
                    self._other_recording = (
                        self._record_pieces(state, side),
                        self.logits,
                        self.greedy_token,
                        self.next_token,
                    )
                finally:
                    self._swap_kda_buffers(state)
                    self.pieces, self.logits, self.greedy_token, self.next_token = first
        self.recordings += 1

    def _record_pieces(self, state: ModelState, stream: torch.cuda.Stream) -> list:
        """One step recorded on `stream`, cut wherever the offloaded experts' runtime has a host step."""
        offload = getattr(self.model, "offload", None)
        pool = torch.cuda.graph_pool_handle()
        pieces = []
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool)

            def cut(host_step):
                nonlocal graph
                graph.capture_end()
                pieces.append((graph, host_step))
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)

            if offload is not None:
                offload.cut_recording = cut
            recorded = False
            try:
                try:
                    self._run(state)
                except BaseException:
                    with suppress(Exception):  # the capture's own error, if any, says less than this one
                        graph.capture_end()
                    raise
                graph.capture_end()
                recorded = True
            finally:
                if offload is not None:
                    offload.cut_recording = None
                    if not recorded and offload.in_place is not None:
                        offload.in_place.forget()  # its pending gathers' events belong to the failed capture
            pieces.append((graph, None))
        return pieces

    def _storage(self, state: ModelState) -> tuple:
        """Where the state's tensors live, whichever of the two sets of KDA buffers it is in: a recording
        is valid while this is unchanged."""
        pointers = []
        others = iter(self._other_buffers)
        for layer in state.layers:
            if isinstance(layer, KDAState):
                other = next(others, None)
                pairs = [(layer.recurrent, layer.conv)] + ([(other.recurrent, other.conv)] if other else [])
                pointers.append(frozenset((r.data_ptr(), c.data_ptr()) for r, c in pairs))
            else:
                pointers.append(layer.buffer.data_ptr())
        return tuple(pointers)


def graph_decoder(model, state: ModelState, vocab_size: int | None = None) -> GraphDecoder:
    """The model's decoder for `state`: the one kept on the model while it serves this state, else a new
    one (dropping the old recording). One per model, since each recording holds GPU memory."""
    decoder = getattr(model, "_graph_decoder", None)
    wanted = vocab_size or model.config.vocab_size
    if decoder is None or decoder.state is not state or decoder.vocab_size != wanted:
        model._graph_decoder = None
        # Off a GPU (the tests, with KIMI_DESK_KERNELS=triton) the same step runs eagerly.
        decoder = GraphDecoder(model, state, wanted, use_cuda_graph=model.device.type == "cuda")
        model._graph_decoder = decoder
    return decoder
