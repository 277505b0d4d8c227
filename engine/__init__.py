"""The engine: model, weights, state, tokenizer, generation, ingestion, sessions.

It speaks token ids; text and presentation are the app's business. Never imports textual. Names are
resolved lazily so that importing a light submodule (errors, config) does not pull in torch.
"""

from importlib import import_module

from kimi_desk.engine.errors import CheckpointError, ConfigError

_LAZY = {
    "load_model": "kimi_desk.engine.weights",
    "KimiLinearConfig": "kimi_desk.engine.config",
    "ModelState": "kimi_desk.engine.state",
    "KDAState": "kimi_desk.engine.state",
    "MLACache": "kimi_desk.engine.state",
}

__all__ = ["CheckpointError", "ConfigError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kimi_desk.engine' has no attribute {name!r}")
