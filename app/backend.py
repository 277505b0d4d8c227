"""What the UI needs from the engine, behind two small factories that the tests replace with fakes.

Everything here that touches torch imports it inside a function: the UI module imports this file at
start-up, and the first screen must paint before torch (seconds to import) is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kimi_desk.engine import loading
from kimi_desk.engine.loading import NO_MODEL_MESSAGE
from kimi_desk.engine.loading import ModelChoiceError as ModelNotFound


class AssistantLike(Protocol):
    """The part of engine.session.Assistant the UI uses (the tests' fake has the same methods)."""

    model: Any
    model_source: str

    # The average tokens/s over reading `tokens` tokens after `start` already read.
    def reading_rate(self, tokens: int = 0, start: int = 0) -> float: ...
    # on_plan(session, tokens_to_read, limit_notices): limit_notices are engine/ingest LimitNotice records.
    def read(self, store, path, *, on_progress=None, cancel=None, on_plan=None): ...
    def document_state(self, session): ...
    def ask(self, session, question, *, sampling=None, max_new_tokens=512, cancel=None): ...


# (model, device) -> a loaded assistant. Runs in a worker thread.
EngineFactory = Callable[[str, str], AssistantLike]
# () -> the session store. Runs in a worker thread (it imports the engine, hence torch).
StoreFactory = Callable[[], Any]


# What the embedded demo model can and cannot do, said wherever it answers (the chat, `ask`).
DEMO_MODEL_NOTE = (
    "The embedded demo model (22 M parameters) reads the whole document and finds a lone fact in it, "
    "but it mixes up look-alike facts and often invents the rest: check what it says."
)
DEMO_MODEL_REMEDY = "For real answers: 'kimi-desk pull moonshotai/Kimi-Linear-48B-A3B-Instruct', then "


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load, and where that choice came from (shown in the UI and in errors)."""

    model: str
    origin: str  # "--model", "settings" or "demo"


def choose_model(cli_model: str | None, settings_model: str) -> ModelChoice:
    """--model, else the settings' model, else the embedded demo model; ModelNotFound if none."""
    if cli_model:
        return ModelChoice(cli_model, "--model")
    if settings_model:
        return ModelChoice(settings_model, "settings")
    if (loading.DEMO_MODEL / "config.json").is_file():
        return ModelChoice(str(loading.DEMO_MODEL), "demo")
    raise ModelNotFound(NO_MODEL_MESSAGE)


def load_assistant(
    model: str,
    device: str,
    quantize: str | None = "auto",
    gpu_memory: str | None = None,
    cpu_memory: str | None = None,
    notice: Callable[[str], None] = lambda line: None,
) -> AssistantLike:
    """The real engine: the default EngineFactory. The model, device and format are the engine's choice
    (engine/loading.py), as for the command line; a model that cannot fit is a one-line problem, before
    anything is loaded. `notice` hears the engine's one-line notices (the format and placement chosen, a
    cache rebuilt), at load time and later."""
    from kimi_desk.engine.loading import load_assistant as load
    from kimi_desk.engine.loading import resolve_model

    return load(resolve_model(model), device, quantize, notice=notice, gpu_memory=gpu_memory, cpu_memory=cpu_memory)


def open_store():
    """The real session store: the default StoreFactory."""
    from kimi_desk.engine.session import SessionStore

    return SessionStore()


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
