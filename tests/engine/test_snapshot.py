"""Snapshots on disk: exact round trips, truncation, crash safety, and refusal of what does not fit."""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch
from fuzzing import check_case, mutate_bytes, mutate_json, tree_state

from kimi_desk.bench.random_checkpoint import write_random_checkpoint
from kimi_desk.engine import load_model
from kimi_desk.engine.snapshot import (
    Identity,
    SnapshotError,
    SnapshotStore,
    read_checked_json,
    write_checked_json,
    write_tensors,
)

TOKENIZER = "tokenizer-under-test"


@pytest.fixture(scope="module")
def model(tail7_checkpoint):
    return load_model(tail7_checkpoint)


def identity(model):
    return Identity(model.fingerprint, TOKENIZER)


def read(model, ids, state=None):
    state = state or model.new_state(1)
    model(ids, state)
    return state


def test_restore_continues_exactly(model, tmp_path):
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    store = SnapshotStore(tmp_path, identity(model))
    state = model.new_state(1)
    for a, b in [(0, 70), (70, 200), (200, 260)]:
        model(ids[:, a:b], state)
        store.save(state)
    assert store.positions == [70, 200, 260] and store.cached_tokens == 260
    reference = model(ids[:, 260:], state.clone())

    reopened = SnapshotStore(tmp_path, identity(model))  # as a fresh process would
    restored = reopened.restore(260, model.new_state(1))
    assert restored.position == 260
    assert torch.equal(model(ids[:, 260:], restored), reference)

    # An earlier checkpoint truncates the cache: continuing from 70 equals never having read past it.
    from_70 = reopened.restore(70, model.new_state(1))
    want = read(model, ids[:, :70])
    assert torch.equal(model(ids[:, 70:90], from_70), model(ids[:, 70:90], want))


def test_truncate_then_reread(model, tmp_path):
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    store = SnapshotStore(tmp_path, identity(model))
    state = model.new_state(1)
    for a, b in [(0, 50), (50, 120), (120, 200)]:
        model(ids[:, a:b], state)
        store.save(state)
    store.truncate_after(50)
    assert store.positions == [50] and store.cached_tokens == 50
    other = torch.randint(0, model.config.vocab_size, (1, 80))
    state = store.restore(50, model.new_state(1))
    model(other, state)
    store.save(state)
    names = {p.name for p in tmp_path.glob("*.safetensors")}
    assert len(names) == 4  # kda at 50 and 130, mla segments 0-50 and 50-130: nothing stale left
    want = read(model, other, read(model, ids[:, :50]))  # the same chunking: bit-exact
    got = SnapshotStore(tmp_path, identity(model)).restore(130, model.new_state(1))
    probe = torch.randint(0, model.config.vocab_size, (1, 5))
    assert torch.equal(model(probe, got), model(probe, want))


def test_another_model_or_tokenizer_is_refused(model, tmp_path):
    store = SnapshotStore(tmp_path / "s", identity(model))
    store.save(read(model, torch.randint(0, 512, (1, 40))))
    other_path = write_random_checkpoint(model.config, tmp_path / "other", seed=99)
    other = load_model(other_path)
    assert other.fingerprint != model.fingerprint
    with pytest.raises(SnapshotError, match="another model"):
        SnapshotStore(tmp_path / "s", identity(other))
    with pytest.raises(SnapshotError, match="another tokenizer"):
        SnapshotStore(tmp_path / "s", Identity(model.fingerprint, "a different tokenizer"))


def test_damaged_files_are_refused_and_nothing_else_is_lost(model, tmp_path):
    store = SnapshotStore(tmp_path, identity(model))
    state = model.new_state(1)
    model(torch.randint(0, 512, (1, 60)), state)
    store.save(state)
    model(torch.randint(0, 512, (1, 60)), state)
    store.save(state)
    kda_file = sorted(tmp_path.glob("kda-000000000120-*.safetensors"))[0]
    good = kda_file.read_bytes()
    data = bytearray(good)
    data[-10] ^= 0x40  # one flipped bit in the tensor data
    kda_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=rf"{kda_file.name}: damaged \(checksum mismatch\)"):
        store.restore(120, model.new_state(1))
    # The other checkpoint is still good.
    assert store.restore(60, model.new_state(1)).position == 60

    kda_file.write_bytes(good)
    mla_file = sorted(tmp_path.glob("mla-000000000060-*.safetensors"))[0]
    mla_file.write_bytes(mla_file.read_bytes()[:100])
    with pytest.raises(SnapshotError, match="damaged or truncated"):
        store.restore(120, model.new_state(1))

    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"position": 60', '"position": 61'))
    with pytest.raises(SnapshotError, match=r"manifest.json: damaged \(checksum mismatch\)"):
        SnapshotStore(tmp_path, identity(model))


WRITER = textwrap.dedent(
    """
    import sys, torch
    from kimi_desk.engine import load_model
    from kimi_desk.engine import snapshot
    from kimi_desk.engine.snapshot import Identity, SnapshotStore

    model = load_model(sys.argv[1])
    store = SnapshotStore(sys.argv[2], Identity(model.fingerprint, sys.argv[3]))
    state = store.restore(store.positions[-1], model.new_state(1))
    model(torch.randint(0, 512, (1, 3000)), state)
    real_write = snapshot.atomic_write

    def slow_write(path, data):
        # Write the temporary file slowly, so that the kill lands in the middle of it.
        print("writing", flush=True)
        with open(path.parent / ("." + path.name + ".partial.tmp"), "wb") as fh:
            for i in range(0, len(data), 1024):
                fh.write(data[i : i + 1024]); fh.flush()
                import time; time.sleep(0.01)
        real_write(path, data)

    snapshot.atomic_write = slow_write
    store.save(state)
    print("finished", flush=True)
    """
)


def test_sigkill_while_writing_leaves_the_previous_snapshot_loadable(model, tail7_checkpoint, tmp_path):
    store = SnapshotStore(tmp_path / "snap", identity(model))
    ids = torch.randint(0, 512, (1, 100))
    state = read(model, ids)
    store.save(state)
    probe = torch.randint(0, 512, (1, 4))
    expected = model(probe, state.clone())

    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tail7_checkpoint), str(tmp_path / "snap"), TOKENIZER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    reopened = SnapshotStore(tmp_path / "snap", identity(model))
    assert reopened.positions == [100]
    assert torch.equal(model(probe, reopened.restore(100, model.new_state(1))), expected)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from kimi_desk.engine.snapshot import atomic_write

    target = tmp_path / "f.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_only_batch_size_one(model, tmp_path):
    store = SnapshotStore(tmp_path, identity(model))
    with pytest.raises(ValueError, match="batch size 1"):
        store.save(model.new_state(2))


def saved_store(model, folder, lengths=(40, 30)):
    """A snapshot folder with a checkpoint after each of `lengths` more tokens; returns its manifest's path."""
    store = SnapshotStore(folder, identity(model))
    state = model.new_state(1)
    for length in lengths:
        model(torch.randint(0, 512, (1, length)), state)
        store.save(state)
    return folder / "manifest.json"


def rewrite_manifest(path, edit):
    """Edit the manifest's payload and write it back with a matching checksum, as a forger would."""
    manifest = read_checked_json(path)
    edit(manifest)
    write_checked_json(path, manifest)


def test_manifest_file_names_never_reach_outside_the_folder(model, tmp_path):
    """A manifest naming ../x must not make restore read a file outside the snapshot (here another
    snapshot's valid checkpoint, which would restore without complaint)."""
    saved_store(model, tmp_path / "other")
    outside = sorted((tmp_path / "other").glob("kda-*.safetensors"))[0]
    manifest = saved_store(model, tmp_path / "snap")
    for name in (f"../other/{outside.name}", str(outside), "..", ".hidden.safetensors", "a\\b.safetensors"):
        rewrite_manifest(manifest, lambda m: m["checkpoints"][0].update(file=name))
        with pytest.raises(SnapshotError, match=r"manifest.json: damaged \(a checkpoint entry names the file"):
            SnapshotStore(tmp_path / "snap", identity(model))
    assert outside.is_file()


@pytest.mark.parametrize(
    "edit,message",
    [
        pytest.param(
            lambda m: m["checkpoints"][0].update(position="40"),
            "a checkpoint entry has position '40'",
            id="str-position",
        ),
        pytest.param(lambda m: m["checkpoints"][0].update(position=True), "has position True", id="bool-position"),
        pytest.param(lambda m: m["checkpoints"][0].update(position=-1), "has position -1", id="negative-position"),
        pytest.param(
            lambda m: m["checkpoints"][-1].update(position=10**100), "a checkpoint at 1000", id="position-past-cache"
        ),
        pytest.param(lambda m: m["checkpoints"].reverse(), "not in order", id="unordered"),
        pytest.param(lambda m: m["checkpoints"][0].pop("file"), "names the file None", id="no-file"),
        pytest.param(
            lambda m: m["checkpoints"][0].update(file=["x"]), "names the file a list of 1 item", id="list-file"
        ),
        pytest.param(lambda m: m["checkpoints"][0].update(sha256=7), "has sha256 7", id="int-sha"),
        pytest.param(lambda m: m["checkpoints"].append([1]), "a checkpoint entry is a list of 1 item", id="list-entry"),
        pytest.param(
            lambda m: m.update(checkpoints={"a": 1}), "no checkpoint or segment list", id="checkpoints-object"
        ),
        pytest.param(lambda m: m.pop("segments"), "no checkpoint or segment list", id="no-segments"),
        pytest.param(lambda m: m["segments"][1].update(start=41), "segments do not follow each other", id="gap"),
        pytest.param(lambda m: m["segments"][0].update(end="40"), "a segment entry has end '40'", id="str-end"),
        pytest.param(lambda m: m.update(counter=None), "counter is None", id="no-counter"),
        pytest.param(lambda m: m.update(model_fingerprint=["x"] * 1000), "another model", id="list-fingerprint"),
        pytest.param(lambda m: m.update(format_version="9" * 10_000), "snapshot format '9999", id="long-version"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_one_line(model, tmp_path, edit, message):
    manifest = saved_store(model, tmp_path)
    rewrite_manifest(manifest, edit)
    with pytest.raises(SnapshotError, match="manifest.json: ") as info:
        SnapshotStore(tmp_path, identity(model))
    text = str(info.value)
    assert message in text and "\n" not in text and len(text) < len(str(tmp_path)) + 200, text


def test_checked_json_that_is_not_an_object_is_damaged(tmp_path):
    path = tmp_path / "manifest.json"
    for text in (
        "[]",
        '{"payload": [], "checksum": "x"}',
        '{"payload": {}, "checksum": 5}',
        "[" * 100_000,
        '{"payload": ' + "[" * 900 + "]" * 900 + ', "checksum": "x"}',
    ):
        path.write_text(text)
        with pytest.raises(SnapshotError, match=r"manifest.json: damaged \("):
            read_checked_json(path)


@pytest.mark.parametrize("kind", ["kda", "mla"])
def test_tensors_of_the_wrong_shape_are_refused_on_restore(model, tmp_path, kind):
    """A checkpoint or segment file that passes its checksums but holds tensors of other shapes (a 0-dim
    one included, which the checksum must handle too) is refused with the file named."""
    manifest = saved_store(model, tmp_path)
    layer = model.config.layer_kinds.index(kind)
    if kind == "kda":
        entries, message = "checkpoints", "state of shape []"
        tensors = {f"layers.{layer}.recurrent": torch.tensor(1.0), f"layers.{layer}.conv": torch.tensor(2.0)}
    else:
        entries, tensors, message = (
            "segments",
            {f"layers.{layer}.latents": torch.zeros(3, 40)},
            "latents of shape [3, 40]",
        )
    # The file the manifest names, rewritten (a name the store made), so that only the shapes are wrong.
    file = read_checked_json(manifest)[entries][0]["file"]
    digest = write_tensors(tmp_path / file, tensors, identity(model))
    rewrite_manifest(manifest, lambda m: m[entries][0].update(sha256=digest))
    with pytest.raises(SnapshotError, match=re.escape(file) + ": .*" + re.escape(message)):
        SnapshotStore(tmp_path, identity(model)).restore(40, model.new_state(1))


def test_a_store_with_a_base_continues_the_state_in_place(model, tmp_path):
    """A thread's store (engine/session.py): segments from the document's end, checkpoints keyed; the
    restored state continues the document's cache where it is, and continues exactly."""
    ids = torch.randint(0, model.config.vocab_size, (1, 200))
    document = read(model, ids[:, :120])
    document.reserve(256)
    store = SnapshotStore(tmp_path / "thread", identity(model), base=120)
    thread = document.continuation()
    model(ids[:, 120:150], thread)
    store.save(thread, key="a" * 64)
    model(ids[:, 150:170], thread)
    store.save(thread, key="b" * 64)
    reference = model(ids[:, 170:], thread.clone())
    assert store.position_of("b" * 64) == 170 and store.key_at(150) == "a" * 64 and store.cached_tokens == 170

    again = SnapshotStore(tmp_path / "thread", identity(model), base=120).restore(170, document)
    assert all(a.shares_rows_with(b) for a, b in zip(again.layers, document.layers) if hasattr(a, "shared"))
    assert torch.equal(model(ids[:, 170:], again), reference)
    store.forget_checkpoints_before(170)
    store.truncate_after(120)
    assert (
        store.positions == []
        and store.cached_tokens == 120
        and sorted(p.name for p in store.folder.iterdir()) == ["manifest.json"]
    )
    with pytest.raises(ValueError, match="truncate"):
        again.layers[3].truncate(100)  # the document's rows are not the thread's to drop
    with pytest.raises(SnapshotError, match="starts at 120, not at 0"):
        SnapshotStore(tmp_path / "thread", identity(model))


def checked_json_text(payload_text: str) -> str:
    """A checked JSON file around `payload_text` (mutated JSON text) with the checksum the reader will
    compute, as a forger would write it; a payload that cannot be parsed gets a wrong one."""
    try:
        body = json.dumps(json.loads(payload_text), sort_keys=True, separators=(",", ":"))
        checksum = hashlib.sha256(body.encode()).hexdigest()
    except (ValueError, RecursionError):
        checksum = "0" * 64
    return f'{{"checksum": "{checksum}", "payload": {payload_text}}}'


def test_fuzzed_snapshots_end_in_states_or_one_line(model, tmp_path):
    """Mutations of the manifest (its JSON, with a matching checksum, or its bytes) and of the tensor
    files: opening the store, restoring every checkpoint and truncating end in states or in one
    SnapshotError line; never another exception, a hang, or a file read, written or deleted outside
    the snapshot folder."""
    base = tmp_path / "base"
    saved_store(model, base, lengths=(40, 30, 25))
    payload = read_checked_json(base / "manifest.json")
    # Files a manifest could name with ../ (the case folder is three levels down): they must stay as they are.
    for name in ("outside.safetensors", "a/outside.safetensors", "a/b/outside.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sorted(base.glob("kda-*"))[0], tmp_path / name)
    case = tmp_path / "a" / "b" / "snap"
    outcomes = Counter()
    for seed in range(120):
        rng = random.Random(seed)
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(base, case)
        kind = rng.choice(["manifest json", "manifest json", "manifest bytes", "tensor file"])
        if kind == "manifest json":
            text, what = mutate_json(payload, rng)
            (case / "manifest.json").write_text(checked_json_text(text))
        elif kind == "manifest bytes":
            data, what = mutate_bytes((case / "manifest.json").read_bytes(), rng)
            (case / "manifest.json").write_bytes(data)
        else:
            target = rng.choice(sorted(case.glob("*.safetensors")))
            data, what = mutate_bytes(target.read_bytes(), rng)
            target.write_bytes(data)
            what = f"{target.name}: {what}"
        outside = tree_state(tmp_path, skip=case)

        def run():
            store = SnapshotStore(case, identity(model))
            for position in store.positions:
                state = store.restore(position, model.new_state(1))
                assert state.position == position
            store.truncate_after(store.positions[0] if store.positions else 0)

        outcomes[check_case(run, SnapshotError, seed, f"{kind}: {what}")] += 1
        assert tree_state(tmp_path, skip=case) == outside, f"seed {seed} ({kind}: {what}) touched a file outside"
    assert outcomes["ok"] >= 1 and outcomes["refused"] >= 100, outcomes


def test_a_store_with_no_checkpoint_yet_reopens(tmp_path):
    """A reading stopped before its first checkpoint leaves a manifest with empty lists."""
    identity = Identity("m0", "t0")
    SnapshotStore(tmp_path / "snap", identity).truncate_after(0)
    store = SnapshotStore(tmp_path / "snap", identity)
    assert store.positions == [] and store.files == [] and store.cached_tokens == 0
