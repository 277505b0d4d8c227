"""The engine: model, weights, state (and later tokenizer, generation, ingestion, sessions).

It speaks token ids; text and presentation are the app's business. Never imports textual.
"""

from kimi_desk.engine.config import ConfigError, KimiLinearConfig
from kimi_desk.engine.state import KDAState, MLACache, ModelState
from kimi_desk.engine.weights import CheckpointError, load_model

__all__ = ["load_model", "KimiLinearConfig", "ConfigError", "CheckpointError", "ModelState", "KDAState", "MLACache"]
