"""The placement planner: budgets, which experts go where, the one-line description and refusals."""

import pytest
import torch

from kimi_desk.bench.random_checkpoint import kimi_linear_48b_config, tiny_config
from kimi_desk.engine import placement
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.memory import estimate_memory
from kimi_desk.engine.placement import (
    GIB,
    PlacementError,
    parse_size,
    plan_placement,
    staging_experts,
)

BIG = kimi_linear_48b_config()


@pytest.mark.parametrize(
    "text, value",
    [
        ("24GiB", 24 * GIB),
        ("16GB", 16 * 10**9),
        ("512 MiB", 512 << 20),
        ("1.5gib", 3 * GIB // 2),
        (" 2T ", 2 * 10**12),
        ("100mb", 100 * 10**6),
        ("64g", 64 * 10**9),
        ("1TiB", 1 << 40),
    ],
)
def test_sizes_are_parsed_with_their_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text, says",
    [
        ("24", "needs a unit"),
        ("lots", "is not a size"),
        ("24 GiBs", "is not a size"),
        ("-3GiB", "is not a size"),
        ("12KB", "too small"),
        ("", "is not a size"),
        ("1e9GB", "is not a size"),
    ],
)
def test_bad_sizes_are_one_line_user_errors(text, says):
    with pytest.raises(UserError) as refused:
        parse_size(text, "--gpu-memory")
    message = str(refused.value)
    assert says in message and "--gpu-memory" in message and "\n" not in message


def test_a_model_that_fits_goes_whole_on_the_gpu():
    plan = plan_placement(BIG, "bfloat16", "int4", gpu_budget=80 * GIB, cpu_budget=8 * GIB)
    assert not plan.offloaded and plan.ram_count == 0 and plan.staging_bytes == 0
    assert plan.total_experts == 26 * 256 == plan.gpu_count
    assert plan.describe().startswith("GPU ") and plan.describe().endswith("the whole model")
    estimate = estimate_memory(BIG, "bfloat16", "int4", prefill_chunk=8192)
    assert plan.gpu_bytes == estimate["total_bytes"]


@pytest.mark.parametrize("budget_gib", [12, 16, 24])
def test_the_48b_model_in_int4_on_desktop_cards(budget_gib):
    plan = plan_placement(BIG, "bfloat16", "int4", gpu_budget=budget_gib * GIB, cpu_budget=64 * GIB)
    assert plan.offloaded and 0 < plan.gpu_count < plan.total_experts
    assert plan.gpu_bytes <= budget_gib * GIB < plan.gpu_bytes + plan.expert_bytes
    # 3 matrices of 2304 x 1024 in int4 with groups of 32..128: about 3.6 MiB an expert.
    assert 3.4 * 2**20 < plan.expert_bytes < 3.8 * 2**20
    assert plan.ram_bytes == plan.ram_count * plan.expert_bytes
    assert plan.staging_bytes == staging_experts(256) * plan.expert_bytes
    # Every MoE layer gets its share (layer 0 is dense and has none).
    counts = [len(plan.gpu_experts[i]) for i in plan.moe_layers]
    assert plan.moe_layers == list(range(1, 27)) and max(counts) - min(counts) <= 1
    for i in plan.moe_layers:
        assert sorted(plan.gpu_experts[i] + plan.ram_experts(i)) == list(range(256))
    line = plan.describe()
    assert line == (
        f"GPU {plan.gpu_bytes / GIB:.1f} GiB: attention, shared experts, {plan.gpu_count:,} of 6,656 "
        f"routed experts; RAM {plan.ram_bytes / GIB:.1f} GiB: the others"
    )
    assert "\n" not in line


def test_more_budget_places_more_experts_on_the_gpu():
    counts = [plan_placement(BIG, "bfloat16", "int4", gpu_budget=g * GIB).gpu_count for g in (12, 16, 20, 24)]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_known_usage_puts_the_most_used_experts_on_the_gpu():
    config = tiny_config(num_hidden_layers=4, kda_layers=[1, 2, 3], full_attn_layers=[4], num_experts=32)
    whole = plan_placement(config, "float32", None, gpu_budget=1 << 40)
    per = whole.expert_bytes
    budget = whole.fixed_bytes + (staging_experts(32) + 5) * per  # slots, 5 experts
    usage = {1: [0] * 32, 2: [0] * 32, 3: [0] * 32}
    usage[1][1], usage[1][6], usage[2][0], usage[2][31], usage[2][7], usage[3][2] = 9, 7, 8, 1, 6, 0.5
    plan = plan_placement(config, "float32", None, gpu_budget=budget, usage=usage)
    assert plan.gpu_experts == {1: (1, 6), 2: (0, 7, 31), 3: ()}
    assert plan.ram_experts(1) == (0, *range(2, 6), *range(7, 32))
    even = plan_placement(config, "float32", None, gpu_budget=budget)
    assert even.gpu_experts == {1: (0, 1), 2: (0, 1), 3: (0,)}


def test_a_budget_below_what_every_token_needs_names_the_smallest_that_works():
    with pytest.raises(PlacementError) as refused:
        plan_placement(
            BIG, "bfloat16", "int4", gpu_budget=4 * GIB, cpu_budget=64 * GIB, model_name="Kimi-Linear-48B-A3B"
        )
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--gpu-memory 4.0 GiB is too small for Kimi-Linear-48B-A3B")
    smallest = message.rsplit("--gpu-memory ", 1)[1]
    assert smallest.endswith("GiB")
    # The budget it names works, and a tenth of a GiB less would not.
    works = parse_size(smallest)
    plan = plan_placement(BIG, "bfloat16", "int4", gpu_budget=works, cpu_budget=64 * GIB)
    assert plan.offloaded and plan.gpu_count * plan.expert_bytes < GIB // 10
    with pytest.raises(PlacementError):
        plan_placement(BIG, "bfloat16", "int4", gpu_budget=works - GIB // 10, cpu_budget=64 * GIB)


def test_too_little_ram_for_the_experts_left_over_says_what_to_raise():
    with pytest.raises(PlacementError) as refused:
        plan_placement(BIG, "bfloat16", "int4", gpu_budget=16 * GIB, cpu_budget=8 * GIB)
    message = str(refused.value)
    assert "\n" not in message and "--cpu-memory is 8.0 GiB" in message and "raise --gpu-memory to" in message
    wanted = parse_size(message.rsplit("raise --gpu-memory to ", 1)[1])
    plan = plan_placement(BIG, "bfloat16", "int4", gpu_budget=wanted, cpu_budget=8 * GIB)
    assert plan.ram_bytes <= 8 * GIB
    with pytest.raises(PlacementError) as refused:
        plan_placement(BIG, "bfloat16", "int8", gpu_budget=16 * GIB, cpu_budget=8 * GIB)
    assert str(refused.value).endswith("or use --quantize int4")


def test_the_plan_counts_the_context_asked_for():
    short = plan_placement(BIG, "bfloat16", "int4", gpu_budget=16 * GIB, context_tokens=8192)
    long = plan_placement(BIG, "bfloat16", "int4", gpu_budget=16 * GIB, context_tokens=1 << 18)
    assert short.gpu_count > long.gpu_count and long.context_tokens == 1 << 18


def test_default_budgets_leave_a_margin():
    assert placement.default_gpu_budget(12 * GIB) == 12 * GIB - placement.GPU_MARGIN_BYTES
    assert placement.default_gpu_budget(140 * GIB) == 126 * GIB
    assert placement.default_gpu_budget(GIB) == 0
    assert placement.default_cpu_budget(None) is None
    assert placement.default_cpu_budget(64 * GIB) == 62 * GIB


def test_skewed_usage_spends_the_same_budget_on_the_most_used_experts():
    # The 48B shapes: a few experts per layer take most of the choices, more of them in the later layers.
    gen = torch.Generator().manual_seed(0)
    usage = {i: (torch.rand(256, generator=gen) ** (4 + i)).mul(1e6).long().tolist() for i in range(1, 27)}
    even = plan_placement(BIG, "bfloat16", "int4", gpu_budget=16 * GIB, cpu_budget=64 * GIB)
    plan = plan_placement(
        BIG, "bfloat16", "int4", gpu_budget=16 * GIB, cpu_budget=64 * GIB, usage=usage, usage_tokens=45_600
    )
    assert plan.gpu_count == even.gpu_count and plan.gpu_bytes == even.gpu_bytes <= 16 * GIB
    assert plan.ram_bytes == even.ram_bytes
    # Every expert on the GPU is used at least as much as every one in RAM, over all the layers.
    on_gpu = [usage[i][e] for i in plan.moe_layers for e in plan.gpu_experts[i]]
    in_ram = [usage[i][e] for i in plan.moe_layers for e in plan.ram_experts(i)]
    assert min(on_gpu) >= max(in_ram)
    assert sum(on_gpu) > sum(usage[i][e] for i in even.moe_layers for e in even.gpu_experts[i])
    counts = [len(plan.gpu_experts[i]) for i in plan.moe_layers]
    assert max(counts) - min(counts) > 1  # the budget goes where the choices are, not evenly
    assert "routed experts, the most used first (usage of 45.6 k tokens read); RAM" in plan.describe()
    assert plan.to_dict()["usage_tokens"] == 45_600 and even.usage_tokens is None
    # A model that fits whole says nothing of usage.
    whole = plan_placement(BIG, "bfloat16", "int4", gpu_budget=80 * GIB, usage=usage, usage_tokens=45_600)
    assert whole.describe().endswith("the whole model") and whole.usage_tokens is None


def test_experts_used_equally_take_turns_between_the_layers():
    config = tiny_config(num_hidden_layers=4, kda_layers=[1, 2, 3], full_attn_layers=[4], num_experts=32)
    whole = plan_placement(config, "float32", None, gpu_budget=1 << 40)
    budget = whole.fixed_bytes + (staging_experts(32) + 7) * whole.expert_bytes
    usage = {1: [0] * 32, 2: [0] * 32, 3: [0] * 32}
    usage[2][9] = 4  # one expert used, the others never (a short reading)
    plan = plan_placement(config, "float32", None, gpu_budget=budget, usage=usage, usage_tokens=2)
    assert plan.gpu_experts == {1: (0, 1), 2: (0, 1, 9), 3: (0, 1)}
    assert "(usage of 2 tokens read)" in plan.describe()
    with pytest.raises(ValueError, match="usage of layer 1 has 3 experts"):
        plan_placement(config, "float32", None, gpu_budget=budget, usage={1: [1, 2, 3]})
