"""Expert usage: counted while reading (the router's choices, prefill calls only), kept per model in the
data folder (round trip, sums, a damaged file ignored in one line), used by the load path's plan."""

import pytest
import torch

from kimi_desk.engine import loading
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.fuse import fuse_projections
from kimi_desk.engine.model import SparseMoE
from kimi_desk.engine.placement import GIB, plan_placement, staging_experts
from kimi_desk.engine.session import Assistant, SessionStore
from kimi_desk.engine.usage import ExpertUsage, add_usage, read_usage, usage_file
from kimi_desk.engine.weights import checkpoint_fingerprint, load_model

FINGERPRINT = "0123456789abcdef0123456789abcdef"


def router_choices(model, ids):
    """The routers' choices of one forward call, seen from outside: each gate's output, recorded."""
    seen = {}

    def record(n):
        def hook(module, inputs, out):
            seen[n] = out[0].clone()

        return hook

    hooks = [
        layer.block_sparse_moe.gate.register_forward_hook(record(n))
        for n, layer in enumerate(model.model.layers)
        if hasattr(layer, "block_sparse_moe")
    ]
    try:
        model(ids, model.new_state(1))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("fused", [False, True])
def test_counts_are_a_bincount_of_the_routers_choices(tail7_checkpoint, fused):
    model = load_model(tail7_checkpoint, dtype=torch.float32)
    if fused:  # the shared expert joins the stack and every choice, as expert E: not counted
        model = fuse_projections(model)
        assert any(m.gate.shared_expert == 8 for m in model.modules() if isinstance(m, SparseMoE))
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(3))
    usage = ExpertUsage.for_model(model)
    assert usage.layers == (1, 2, 3, 4, 5, 6) and usage.counts.dtype == torch.int64
    with usage.counting(model):
        model(ids, model.new_state(1))
    choices = router_choices(model, ids)
    top_k = model.config.num_experts_per_token
    want = torch.stack([torch.bincount(choices[i][:, :top_k].reshape(-1), minlength=8) for i in usage.layers])
    assert torch.equal(usage.counts, want) and int(want.sum()) == 6 * 80 * top_k
    assert usage.counted_tokens(top_k) == 80
    # Off the counting block, and for calls of a few tokens (decode steps), nothing is counted.
    before = usage.counts.clone()
    model(ids, model.new_state(1))
    with usage.counting(model):
        state = model.new_state(1)
        model(ids[:, :32], state)
        for t in range(32, 40):
            model(ids[:, t : t + 1], state)
    assert torch.equal(usage.counts, before)
    assert all(m.usage is None for m in model.modules() if isinstance(m, SparseMoE))


def usage_of(counts, tokens, layers=(1, 2, 3)):
    return ExpertUsage(tuple(layers), torch.tensor(counts, dtype=torch.int64), tokens)


def test_the_usage_file_round_trips_and_sums(tmp_path):
    first = usage_of([[3, 0, 1, 0], [0, 2, 2, 0], [1, 1, 1, 1]], 2)
    assert add_usage(tmp_path, FINGERPRINT, first).tokens == 2
    path = usage_file(tmp_path, FINGERPRINT)
    assert path == tmp_path / "usage" / f"{FINGERPRINT}.safetensors" and path.is_file()
    back = read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 4)
    assert torch.equal(back.counts, first.counts) and back.tokens == 2 and back.layers == (1, 2, 3)
    add_usage(tmp_path, FINGERPRINT, usage_of([[1, 1, 0, 0], [0, 0, 0, 2], [0, 0, 2, 0]], 1))
    total = read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 4)
    assert total.tokens == 3 and total.counts.tolist() == [[4, 1, 1, 0], [0, 2, 2, 2], [1, 1, 3, 1]]
    assert total.per_layer() == {1: [4, 1, 1, 0], 2: [0, 2, 2, 2], 3: [1, 1, 3, 1]}
    # Nothing for another checkpoint, nor for a model without a fingerprint; nothing left behind.
    assert read_usage(tmp_path, "f" * 32, (1, 2, 3), 4) is None
    assert add_usage(tmp_path, "unloaded", first) is None and usage_file(tmp_path, "../x") is None
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{path.name}.lock", path.name]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"\xff" * 40,
        lambda data: b"",
        lambda data: data.replace(b'"kimi_desk_usage":"1"', b'"kimi_desk_usage":"9"'),
        lambda data: data.replace(b'"layers":"1,2,3"', b'"layers":"1,2,4"'),
    ],
)
def test_a_damaged_usage_file_is_ignored_in_one_line(tmp_path, damage):
    add_usage(tmp_path, FINGERPRINT, usage_of([[3, 0], [0, 2], [1, 1]], 2))
    path = usage_file(tmp_path, FINGERPRINT)
    path.write_bytes(damage(path.read_bytes()))
    lines = []
    assert read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 2, lines.append) is None
    assert len(lines) == 1 and "\n" not in lines[0] and "is damaged" in lines[0] and "ignored" in lines[0]
    # The next reading replaces it.
    add_usage(tmp_path, FINGERPRINT, usage_of([[1, 0], [0, 1], [1, 0]], 1), lines.append)
    assert read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 2).tokens == 1


def test_counts_of_another_shape_or_sign_are_damage(tmp_path):
    add_usage(tmp_path, FINGERPRINT, usage_of([[3, 0], [0, 2], [1, 1]], 2))
    lines = []
    assert read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 4, lines.append) is None and len(lines) == 1
    from safetensors.torch import save

    path = usage_file(tmp_path, FINGERPRINT)
    meta = {"kimi_desk_usage": "1", "fingerprint": FINGERPRINT, "layers": "1,2,3", "tokens": "2"}
    path.write_bytes(save({"counts": torch.tensor([[3, -1], [0, 2], [1, 1]])}, metadata=meta))
    assert read_usage(tmp_path, FINGERPRINT, (1, 2, 3), 2, lines.append) is None and "negative" in lines[-1]


def test_a_reading_adds_its_usage_to_the_models_file(chat_checkpoint, tmp_path):
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100)
    folder = tmp_path / "doc"
    folder.mkdir()
    for i in range(12):
        (folder / f"f{i}.py").write_text(f"def f{i}():\n    return {i}\n" * 3)
    store = SessionStore(tmp_path / "home")
    session = assistant.read(store, folder)
    fingerprint = assistant.model.fingerprint
    config = assistant.model.config
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    usage = read_usage(store.home, fingerprint, layers, config.num_experts)
    assert 0 < usage.tokens <= session.document_tokens
    assert (usage.counts.sum(1) == usage.tokens * config.num_experts_per_token).all()
    # Reading another document adds to it; with counting off nothing is added.
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("some words to read " * 40)
    assistant.read(store, other)
    more = read_usage(store.home, fingerprint, layers, config.num_experts)
    assert more.tokens > usage.tokens and (more.counts >= usage.counts).all()
    assistant.count_usage = False
    (other / "b.txt").write_text("other words " * 40)
    assistant.read(store, other)
    assert read_usage(store.home, fingerprint, layers, config.num_experts).tokens == more.tokens


def test_a_usage_file_that_cannot_be_written_is_one_notice_and_the_reading_stays(chat_checkpoint, tmp_path):
    lines = []
    assistant = Assistant.load(chat_checkpoint, prefill_chunk=64, checkpoint_interval=100, notice=lines.append)
    store = SessionStore(tmp_path / "home")
    blocker = usage_file(store.home, assistant.model.fingerprint).parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the usage folder goes")
    folder = tmp_path / "doc"
    folder.mkdir()
    (folder / "a.py").write_text("def a():\n    return 1\n" * 20)
    session = assistant.read(store, folder)
    assert session.complete and store.get(session.id).complete
    usage_lines = [line for line in lines if "expert usage" in line]
    assert len(usage_lines) == 1 and "\n" not in usage_lines[0] and "reading itself is saved" in usage_lines[0]


def test_the_load_path_places_the_most_used_experts(tail7_checkpoint, tmp_path):
    config = KimiLinearConfig.from_file(tail7_checkpoint / "config.json")
    whole = plan_placement(config, config.dtype, "int4", gpu_budget=1 << 40)
    budget = whole.fixed_bytes + (staging_experts(8) + 4) * whole.expert_bytes  # slots, 4 experts
    counts = [[0] * 8 for _ in range(6)]
    counts[0][5], counts[2][1], counts[2][7], counts[5][3] = 50, 40, 30, 20
    add_usage(tmp_path, checkpoint_fingerprint(tail7_checkpoint), usage_of(counts, 1_234_567, range(1, 7)))
    lines = []
    fmt, placement = loading.choose_placement(
        tail7_checkpoint, "cuda", "int4", lines.append, gpu_budget=budget, cpu_budget=GIB, home=tmp_path
    )
    assert placement.gpu_experts == {1: (5,), 2: (), 3: (1, 7), 4: (), 5: (), 6: (3,)}
    assert lines == [placement.describe()]
    assert "4 of 48 routed experts, the most used first (usage of 1.2 M tokens read); RAM" in lines[0]
    # No usage kept: the even spread, and the line says nothing of usage.
    lines = []
    _, even = loading.choose_placement(
        tail7_checkpoint, "cuda", "int4", lines.append, gpu_budget=budget, cpu_budget=GIB, home=tmp_path / "none"
    )
    assert even.gpu_experts == {1: (0,), 2: (0,), 3: (0,), 4: (0,), 5: (), 6: ()}
    assert "most used" not in lines[0] and even.gpu_bytes == placement.gpu_bytes
    # A damaged file: the even spread, and one line saying so before the plan's.
    path = usage_file(tmp_path, checkpoint_fingerprint(tail7_checkpoint))
    path.write_bytes(path.read_bytes()[:50])
    lines = []
    _, again = loading.choose_placement(
        tail7_checkpoint, "cuda", "int4", lines.append, gpu_budget=budget, cpu_budget=GIB, home=tmp_path
    )
    assert again.gpu_experts == even.gpu_experts and len(lines) == 2 and "is damaged" in lines[0]
