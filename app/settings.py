"""The user's settings: which model, on which device, and how answers are sampled.

One flat TOML file, `settings.toml`, in $KIMI_DESK_HOME when it is set (beside the sessions), else in
the platform's user config folder. Read with tomllib; written by hand, since the schema is flat
(strings, numbers, one optional integer), which spares a dependency on a TOML writer. Writes are
atomic (temporary file, fsync, rename), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from kimi_desk import environment
from kimi_desk.engine.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")
# The weights' format (engine/loading.py QUANTIZE_CHOICES; kept here too so that this module stays
# light to import).
QUANTIZE = ("auto", "none", "fp8", "int8", "int4")
SETTINGS_FILE = "settings.toml"


class SettingsError(UserError):
    """A settings file or value that cannot be used; one line naming the file or field."""


@dataclass(frozen=True)
class Settings:
    # A local folder (config.json, *.safetensors, tokenizer.json) or a hub repo id already pulled with
    # `kimi-desk pull`; empty means the embedded demo model.
    model: str = ""
    device: str = "auto"
    quantize: str = "auto"
    # Memory budgets (--gpu-memory, --cpu-memory): sizes such as 24GiB or 16GB; empty means what the
    # card has free and what RAM has available, less a margin (engine/placement.py).
    gpu_memory: str = ""
    cpu_memory: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    # None draws a fresh seed per answer; a number makes answers reproducible.
    seed: int | None = None
    theme: str = "textual-dark"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise SettingsError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.quantize not in QUANTIZE:
            raise SettingsError(f"quantize must be one of {', '.join(QUANTIZE)}, not {self.quantize!r}")
        for name in ("gpu_memory", "cpu_memory"):
            _check_size(name, getattr(self, name))
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingsError(f"temperature must be a number >= 0, not {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if self.seed is not None and self.seed < 0:
            raise SettingsError(f"seed must be a non-negative integer or absent, not {self.seed!r}")

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


# The TOML type each field takes; seed may also be absent (None).
def _check_size(name: str, value: str) -> None:
    from kimi_desk.engine.placement import parse_size

    if value:
        try:
            parse_size(value, name)
        except UserError as exc:
            raise SettingsError(str(exc)) from None


_FIELD_TYPES = {
    "model": str,
    "device": str,
    "quantize": str,
    "gpu_memory": str,
    "cpu_memory": str,
    "temperature": float,
    "top_p": float,
    "max_new_tokens": int,
    "seed": int,
    "theme": str,
}


def settings_path() -> Path:
    override = environment.home()
    if override:
        return Path(override).expanduser() / SETTINGS_FILE
    import platformdirs

    return Path(platformdirs.user_config_dir("kimi-desk", appauthor=False)) / SETTINGS_FILE


def _coerce(name: str, value, path: Path):
    want = _FIELD_TYPES[name]
    # TOML integers are fine where a float is expected; booleans are never numbers here.
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, want) and not isinstance(value, bool):
        return value
    raise SettingsError(f"{path}: {name} must be {want.__name__ if want is not str else 'a string'}, not {value!r}")


def load_settings(path: Path | None = None) -> tuple[Settings, list[str]]:
    """The settings in `path` (defaults for what is missing) and the unknown keys found there, which
    are reported rather than silently dropped. A missing file gives the defaults."""
    path = path or settings_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings(), []
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(raw) - known)
    values = {name: _coerce(name, value, path) for name, value in raw.items() if name in known}
    try:
        return Settings(**values), unknown
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def _toml_value(value) -> str:
    if isinstance(value, str):
        # A JSON string (ASCII only, \uXXXX escapes) is also a valid TOML basic string.
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_toml(settings: Settings) -> str:
    lines = ["# kimi-desk settings; edit here or in the app (F3)."]
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            # TOML has no null: an absent key means "not set".
            lines.append(f"# {f.name} is not set")
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    from kimi_desk.engine.atomic import atomic_write

    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, to_toml(settings))
    return path
