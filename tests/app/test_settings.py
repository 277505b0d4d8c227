"""Settings: TOML under KIMI_DESK_HOME (else the user config folder), defaults for what is missing,
unknown keys reported, bad values refused with the field named, atomic writes that read back equal."""

import os

import pytest

from kimi_desk.app.settings import Settings, SettingsError, load_settings, save_settings, settings_path, to_toml


def test_path_follows_kimi_desk_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KIMI_DESK_HOME", str(tmp_path))
    assert settings_path() == tmp_path / "settings.toml"
    monkeypatch.delenv("KIMI_DESK_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert settings_path() == tmp_path / "config" / "kimi-desk" / "settings.toml"


def test_missing_file_gives_defaults(tmp_path):
    assert load_settings(tmp_path / "settings.toml") == (Settings(), [])


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(
            model='C:\\models\\kimi "linear" é',
            device="cuda",
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=1,
            seed=0,
            theme="textual-light",
        ),
        Settings(model="moonshotai/Kimi-Linear-48B-A3B-Instruct", temperature=1e-05, seed=2**40),
        Settings(gpu_memory="24GiB", cpu_memory="64 GB"),
    ],
)
def test_save_then_load_is_the_same(tmp_path, settings):
    path = save_settings(settings, tmp_path / "nested" / "settings.toml")
    assert load_settings(path) == (settings, [])
    # Nothing is left behind by the atomic write.
    assert os.listdir(path.parent) == ["settings.toml"]


def test_seed_absent_means_random(tmp_path):
    text = to_toml(Settings(seed=None))
    assert "seed =" not in text
    path = tmp_path / "settings.toml"
    path.write_text('temperature = 1\nseed = 7\n')
    settings, _ = load_settings(path)
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float) and settings.seed == 7


def test_unknown_keys_are_reported(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('top_p = 0.5\ncolour = "blue"\n')
    assert load_settings(path) == (Settings(top_p=0.5), ["colour"])


@pytest.mark.parametrize(
    "text,message",
    [
        ("temperature = -1\n", "temperature must be a number >= 0"),
        ("top_p = 0\n", "top_p must be in (0, 1]"),
        ('device = "tpu"\n', "device must be one of auto, cpu, cuda"),
        ("max_new_tokens = 0\n", "max_new_tokens must be a positive integer"),
        ('max_new_tokens = "many"\n', "max_new_tokens must be int"),
        ("seed = true\n", "seed must be int"),
        ("model = 3\n", "model must be a string"),
        ("temperature = \n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "settings.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("]", r"\]")) as error:
        load_settings(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "field, value, says", [("gpu_memory", "24", "needs a unit"), ("cpu_memory", "plenty", "is not a size")]
)
def test_memory_budgets_must_be_sizes(tmp_path, field, value, says):
    with pytest.raises(SettingsError, match=says):
        Settings(**{field: value})
    path = tmp_path / "settings.toml"
    path.write_text(f'{field} = "{value}"\n')
    with pytest.raises(SettingsError) as refused:
        load_settings(path)
    assert str(path) in str(refused.value) and field in str(refused.value)
