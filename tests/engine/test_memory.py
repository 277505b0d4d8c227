"""What a model needs in memory per weight format, the check before loading, and `auto`'s choice."""

import json
import os
from pathlib import Path

import pytest
import torch

from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, tiny_config
from kimi_desk.engine import memory
from kimi_desk.engine.loading import choose_format
from kimi_desk.engine.memory import MemoryCheckError
from kimi_desk.engine.weights import build_on_meta, load_model


def one_line(refused) -> str:
    text = str(refused.value)
    assert "\n" not in text
    return text


def test_estimate_counts_the_weights_in_every_format():
    config = tiny_config()
    params = sum(p.numel() for p in build_on_meta(config).parameters())
    estimate = memory.estimate_memory(config, torch.float32)
    assert estimate["parameters"] == params and estimate["weights_bytes"] == 4 * params
    assert estimate["total_bytes"] > estimate["weights_bytes"]

    big = {
        f: memory.estimate_memory(kimi_linear_48b_config(), "bfloat16", None if f == "none" else f)["weights_bytes"]
        for f in memory.FORMATS
    }
    assert 96e9 < big["none"] < 100e9  # bfloat16, and the few fp32 gate parameters
    assert 0.5 * big["none"] < big["fp8"] < 0.55 * big["none"]
    assert big["fp8"] - 1e9 < big["int8"] < big["fp8"]  # the same codes; head and embedding in int8 too
    assert 26e9 < big["int4"] < 30e9  # about 27 GB, as llama.cpp's Q4_K_M of this model


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_the_estimate_is_what_loading_allocates(tail7_checkpoint, method):
    """Counted on the meta device from the rule, it must equal the bytes of the loaded model's tensors."""
    config = json.loads((Path(tail7_checkpoint) / "config.json").read_text())
    model = load_model(tail7_checkpoint, dtype=torch.bfloat16, quantize=method)
    loaded = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    estimate = memory.estimate_memory(model.config, "bfloat16", method)
    assert abs(estimate["weights_bytes"] - loaded) / loaded < 0.001, (estimate["weights_bytes"], loaded)
    assert config["vocab_size"] == model.config.vocab_size


def test_a_refusal_names_the_smallest_format_that_fits_here():
    with pytest.raises(MemoryCheckError) as refused:
        memory.check_memory(
            kimi_linear_48b_config(),
            "cpu",
            torch.bfloat16,
            model_name="Kimi-Linear-48B-A3B",
            available_bytes=40_000_000_000,
        )
    text = one_line(refused)
    assert text.startswith("Kimi-Linear-48B-A3B needs about 9")  # ~95 GiB with the working set
    assert "in bfloat16 (92 GiB of weights); this machine has 37 GiB available." in text
    assert "With --quantize int4 it needs about 28 GiB" in text and "which fits here" in text


def test_a_refusal_where_nothing_fits_says_where_the_smallest_would():
    with pytest.raises(MemoryCheckError) as refused:
        memory.check_memory(
            kimi_linear_48b_config(), "cpu", torch.bfloat16, quantize="int4", available_bytes=16_000_000_000
        )
    text = one_line(refused)
    assert "in int4 weights" in text and "Its smallest format, --quantize int4" in text
    assert "a GPU sold as 32 GB" in text


def test_auto_takes_the_most_faithful_format_that_fits(tmp_path):
    folder = tmp_path / "Kimi-Linear-48B-A3B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(kimi_linear_48b_config().to_dict()))
    said = []
    assert choose_format(folder, "cpu", "auto", said.append, available_bytes=200 * 10**9) is None and said == []
    # The CPU has no fp8 arithmetic: int8 is the next most faithful.
    assert choose_format(folder, "cpu", "auto", said.append, available_bytes=75 * 10**9) == "int8"
    assert len(said) == 1 and "does not fit here in bfloat16" in said[0] and "int8" in said[0]
    assert choose_format(folder, "cpu", "auto", said.append, available_bytes=40 * 10**9) == "int4"
    with pytest.raises(MemoryCheckError, match="in bfloat16 .*smallest format, --quantize int4"):
        choose_format(folder, "cpu", "auto", available_bytes=20 * 10**9)
    with pytest.raises(MemoryCheckError, match="--quantize int8"):
        choose_format(folder, "cpu", "none", available_bytes=75 * 10**9)
    assert choose_format(folder, "cpu", "int4", available_bytes=200 * 10**9) == "int4"


def test_check_memory_passes_a_model_that_fits(monkeypatch):
    assert os.path.exists("/proc/meminfo")  # the tests run on Linux
    estimate = memory.check_memory(tiny_config(), "cpu")
    assert estimate["available_bytes"] > estimate["total_bytes"]
    monkeypatch.setenv("KIMI_DESK_SKIP_MEMORY_CHECK", "1")
    memory.check_memory(kimi_linear_48b_config(), "cpu", available_bytes=1 << 30)


def test_available_cpu_memory_reads_meminfo():
    meminfo = Path("/proc/meminfo").read_text()
    listed = int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1]) * 1024
    available = memory.available_cpu_memory()
    assert 0 < available <= listed * 1.1  # MemAvailable moves a little between the two reads


def test_the_cpu_computes_in_float32_without_bf16_hardware_when_it_fits():
    config = kimi_linear_48b_config()
    f32 = memory.estimate_memory(config, "float32", "int4")["total_bytes"]
    assert memory.cpu_compute_dtype(config, "int4", int(f32) + 1, fast_bf16=False) == "float32"
    assert memory.cpu_compute_dtype(config, "int4", None, fast_bf16=False) == "float32"
    # Where float32 would not fit, the checkpoint's half precision still does: it stays.
    assert memory.cpu_compute_dtype(config, "int4", int(f32) - 1, fast_bf16=False) == "bfloat16"
    assert memory.cpu_compute_dtype(config, None, 100 << 30, fast_bf16=False) == "bfloat16"
    # With bf16 hardware the checkpoint's bf16 is as fast and half the memory.
    assert memory.cpu_compute_dtype(config, "int4", None, fast_bf16=True) == "bfloat16"


def test_the_cpu_compute_dtype_of_a_float32_or_float16_checkpoint():
    config = tiny_config()
    config.dtype = "float32"
    assert memory.cpu_compute_dtype(config, None, None, fast_bf16=True) == "float32"
    config.dtype = "float16"  # no CPU multiplies float16 faster than float32 here
    assert memory.cpu_compute_dtype(config, None, None, fast_bf16=True) == "float32"


def test_cpu_has_fast_bf16_asks_torch_about_the_instructions(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert memory.cpu_has_fast_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not memory.cpu_has_fast_bf16()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not memory.cpu_has_fast_bf16()
