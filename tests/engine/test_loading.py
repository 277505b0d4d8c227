"""From the memory budgets to a format and a placement (engine/loading.py), before anything is loaded."""

import pytest

from kimi_desk.engine import loading
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.placement import GIB, PlacementError, plan_placement, staging_experts


def budget_for(path, fmt, experts_on_gpu: int) -> int:
    """A GPU budget that holds the fixed part, the staging slots and `experts_on_gpu` experts in `fmt`."""
    config = KimiLinearConfig.from_file(path / "config.json")
    whole = plan_placement(config, config.dtype, fmt, gpu_budget=1 << 40)
    return whole.fixed_bytes + (staging_experts(config.num_experts) + experts_on_gpu) * whole.expert_bytes


def test_a_model_that_fits_is_placed_whole_without_a_word(tail7_checkpoint):
    lines = []
    fmt, placement = loading.choose_placement(
        tail7_checkpoint, "cuda", "auto", lines.append, gpu_budget=GIB, cpu_budget=GIB
    )
    assert fmt is None and not placement.offloaded and lines == []


def test_auto_keeps_the_experts_that_do_not_fit_in_ram_in_int4(tail7_checkpoint):
    lines = []
    budget = budget_for(tail7_checkpoint, "int4", 5)
    fmt, placement = loading.choose_placement(
        tail7_checkpoint, "cuda", "auto", lines.append, gpu_budget=budget, cpu_budget=GIB
    )
    assert fmt == "int4" and placement.offloaded and placement.gpu_count == 5
    assert lines == [placement.describe()] and "5 of 48 routed experts" in lines[0]


def test_a_format_asked_for_is_planned_as_asked(tail7_checkpoint):
    budget = budget_for(tail7_checkpoint, "int8", 7)
    fmt, placement = loading.choose_placement(tail7_checkpoint, "cuda", "int8", gpu_budget=budget, cpu_budget=GIB)
    assert fmt == "int8" and placement.gpu_count == 7


def test_budgets_too_small_are_one_line(tail7_checkpoint):
    with pytest.raises(PlacementError, match="the smallest budget that works is --gpu-memory"):
        loading.choose_placement(tail7_checkpoint, "cuda", "int4", gpu_budget=1 << 20, cpu_budget=GIB)
    with pytest.raises(PlacementError, match="--cpu-memory is 0.0 GiB"):
        loading.choose_placement(
            tail7_checkpoint, "cuda", "int4", gpu_budget=budget_for(tail7_checkpoint, "int4", 1), cpu_budget=1024
        )


def test_sizes_from_the_command_line(tail7_checkpoint):
    assert loading.budgets("cuda", "24GiB", "16GB") == (24 * GIB, 16 * 10**9)
    with pytest.raises(PlacementError, match="--gpu-memory '24' needs a unit"):
        loading.budgets("cpu", "24", None)
    # On the CPU the RAM budget is the memory check's: a model over it is refused.
    with pytest.raises(PlacementError, match="needs a unit"):
        loading.choose_placement(tail7_checkpoint, "cpu", "none", cpu_memory="3")
    fmt, placement = loading.choose_placement(tail7_checkpoint, "cpu", "auto", cpu_memory="4GiB")
    assert fmt is None and placement is None


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-hardware", "avx2"])
def test_the_cpu_model_computes_in_the_dtype_this_cpu_is_fast_in(monkeypatch, fast_bf16):
    """load_assistant on the CPU: the checkpoint's bf16 where the CPU multiplies bf16 in hardware, else
    float32 (the embedded model fits); an explicit dtype wins."""
    import torch

    from kimi_desk.engine import memory

    monkeypatch.setattr(memory, "cpu_has_fast_bf16", lambda: fast_bf16)
    assistant = loading.load_assistant(loading.DEMO_MODEL, "cpu", "none")
    assert assistant.model.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert assistant.model.new_state(1).layers[-1].buffer.dtype == assistant.model.dtype
    asked = loading.load_assistant(loading.DEMO_MODEL, "cpu", "none", dtype=torch.bfloat16)
    assert asked.model.dtype == torch.bfloat16
