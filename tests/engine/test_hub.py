"""engine/hub.py against a local stand-in for the Hugging Face hub (tests/hub_standin.py): what `pull`
fetches and refuses, resuming, offline mode, the errors a user meets, `--model` resolution, and the
memory check."""

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
import torch
from hub_standin import HubStandIn, SilentHub

from kimi_desk.engine import hub, load_model
from kimi_desk.engine.hub import HubError

REPO = "moonshotai/Kimi-Linear-tiny"
NOT_NEEDED = {
    "pytorch_model.bin": b"\x80\x04 a pickle" * 64,
    "modeling_kimi.py": b"import os\nos.system('x')\n",
    "README.md": b"# tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
}


@pytest.fixture(autouse=True)
def not_logged_in(monkeypatch, tmp_path):
    """No token from this machine's environment or login may reach the stand-in."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def server():
    with HubStandIn(lifetime=60) as standin:
        yield standin


@pytest.fixture
def served(server, chat_checkpoint):
    """The tiny checkpoint (config, safetensors, tokenizer.json) plus files pull must not fetch."""
    server.add_repo(REPO, chat_checkpoint, extra=NOT_NEEDED)
    return server


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface-hub reads responses in 10 MB pieces and loses the piece in flight when a connection
    drops; smaller pieces let a 3 MB test file be cut part-way through."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def logits_of(path: Path) -> torch.Tensor:
    model = load_model(path)
    return model(torch.arange(12).view(1, 12), model.new_state())


# -- pull -------------------------------------------------------------------------------------------


def test_pull_fetches_only_what_a_checkpoint_needs_and_it_loads(served, chat_checkpoint, tmp_path):
    events = []
    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url, on_progress=events.append)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    for name in NOT_NEEDED:
        assert served.requests_for(name) == [], f"{name} was requested"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).read_bytes() == (chat_checkpoint / name).read_bytes()
    # huggingface-hub's own layout, so its tools and other libraries see the same cache.
    assert path.parent.parent.name == "models--moonshotai--Kimi-Linear-tiny"
    assert (path.parent.parent / "refs" / "main").read_text() == path.name
    torch.testing.assert_close(logits_of(path), logits_of(chat_checkpoint))

    total = sum((chat_checkpoint / n).stat().st_size for n in ("config.json", "model.safetensors", "tokenizer.json"))
    last = events[-1]
    assert (last.bytes_done, last.bytes_total, last.files_done, last.files_total) == (total, total, 3, 3)
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(events, events[1:]))

    # A second pull finds everything in the cache and downloads nothing.
    served.requests.clear()
    assert hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url) == path
    assert [r for r in served.requests if r.method == "GET" and not r.path.startswith("/api/")] == []


def test_pull_sharded_fetches_the_index_shards_only(server, tail7_checkpoint, tmp_path):
    server.add_repo(
        "moonshotai/tail7",
        tail7_checkpoint,
        extra={"consolidated.safetensors": b"not part of the index", "model.pt": b"pickle"},
    )
    path = hub.pull("moonshotai/tail7", cache_dir=tmp_path / "hub", endpoint=server.url)
    shards = sorted(
        set(json.loads((tail7_checkpoint / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    assert len(shards) > 1
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert server.requests_for("consolidated.safetensors") == [] and server.requests_for("model.pt") == []
    torch.testing.assert_close(logits_of(path), logits_of(tail7_checkpoint))


def test_interrupted_pull_resumes_with_a_range_request(served, chat_checkpoint, tmp_path, small_chunks):
    weights = (chat_checkpoint / "model.safetensors").read_bytes()
    cut = 1_000_000
    # The connection drops a megabyte into the weights and the hub stays down: this pull fails.
    served.drop_once("model.safetensors", after_bytes=cut, then_down=True)
    with pytest.raises(HubError) as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    assert "model.safetensors" in one_line(failed) and "run the same command again to resume" in str(failed.value)
    partial = list((tmp_path / "hub").rglob("*.incomplete"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size <= cut

    # The next pull asks only for the rest.
    kept = partial[0].stat().st_size
    served.up()
    served.requests.clear()
    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    assert [r.range for r in served.requests_for("model.safetensors", "GET")] == [f"bytes={kept}-"] * 2  # hub, CDN
    assert (path / "model.safetensors").read_bytes() == weights
    assert list((tmp_path / "hub").rglob("*.incomplete")) == []
    load_model(path)


def test_a_dropped_connection_is_resumed_within_one_pull(served, chat_checkpoint, tmp_path, small_chunks):
    served.drop_once("model.safetensors", after_bytes=500_000)
    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    ranges = [r.range for r in served.requests_for("model.safetensors", "GET") if r.path.startswith("/cdn/")]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert (path / "model.safetensors").read_bytes() == (chat_checkpoint / "model.safetensors").read_bytes()


def test_damaged_download_is_refused_and_deleted(served, tmp_path):
    served.corrupt("model.safetensors")
    with pytest.raises(HubError, match="does not match the checksum") as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    one_line(failed)
    assert list((tmp_path / "hub").rglob("*.incomplete")) == []
    assert not list((tmp_path / "hub").rglob("snapshots/*/model.safetensors"))


def test_offline_uses_the_cache_and_says_when_it_is_empty(served, tmp_path, monkeypatch):
    from huggingface_hub import constants

    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served.requests.clear()
    assert hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url) == path
    assert served.requests == []
    with pytest.raises(HubError) as failed:
        hub.pull(REPO, cache_dir=tmp_path / "empty", endpoint=served.url)
    assert "HF_HUB_OFFLINE" in one_line(failed) and REPO in str(failed.value)
    assert served.requests == []


def test_unreachable_hub_is_one_clear_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HubError) as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=f"http://127.0.0.1:{port}")
    text = one_line(failed)
    assert text.startswith(f"cannot reach the Hugging Face hub at http://127.0.0.1:{port} (")
    assert "HF_ENDPOINT" in text and "--model" in text


@pytest.fixture
def short_timeout(monkeypatch):
    """Half a second for every request; huggingface-hub's pauses between its retries of a stalled
    download (a second each, five of them) are not what these tests measure."""
    import huggingface_hub.file_download

    monkeypatch.setenv(hub.HUB_TIMEOUT_ENV, "0.5")
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)


def test_a_hub_that_never_answers_is_one_line_within_the_timeout(tmp_path, short_timeout):
    """An endpoint that accepts the connection and says nothing: without a timeout, a pull never ends."""
    with SilentHub() as silent:
        started = time.monotonic()
        with pytest.raises(HubError) as failed:
            hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=silent.url)
        elapsed = time.monotonic() - started
    assert one_line(failed).startswith(
        f"the hub at {silent.url} did not answer within 0.5 s while listing {REPO}'s files; "
    )
    assert "KIMI_DESK_HUB_TIMEOUT" in str(failed.value) and silent.connections == 1 and elapsed < 3


def test_a_download_that_stalls_is_one_line_and_resumes_later(
    served, chat_checkpoint, tmp_path, short_timeout, small_chunks
):
    """The hub sends the headers and part of the weights, then nothing, the connection open."""
    served.stall("model.safetensors", after_bytes=200_000)
    started = time.monotonic()
    with pytest.raises(HubError) as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    assert time.monotonic() - started < 10
    text = one_line(failed)
    assert text.startswith("download of model.safetensors stopped at ") and "run the same command again" in text
    assert "the hub sent nothing for 0.5 s" in text
    served._stalls.clear()
    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    assert (path / "model.safetensors").read_bytes() == (chat_checkpoint / "model.safetensors").read_bytes()


def test_a_file_request_that_is_never_answered_names_the_file(served, tmp_path, short_timeout):
    """The listing answers, the request for one file does not."""
    served.silence("config.json")
    with pytest.raises(HubError, match=r"did not answer within 0\.5 s while asking for config\.json; ") as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    one_line(failed)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1e9"])
def test_a_bad_timeout_setting_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv(hub.HUB_TIMEOUT_ENV, value)
    with pytest.raises(HubError, match="KIMI_DESK_HUB_TIMEOUT=.*expected a number of seconds") as failed:
        hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint="http://127.0.0.1:9")
    one_line(failed)


@pytest.mark.parametrize(
    "repo_id,revision,gated,expected",
    [
        ("moonshotai/no-such-model", None, False, "moonshotai/no-such-model: no such model on the hub"),
        (REPO, "v9", False, f"{REPO} has no revision 'v9'"),
        ("moonshotai/gated", None, True, "moonshotai/gated is gated: accept its terms"),
    ],
)
def test_hub_refusals_are_one_clear_line(server, chat_checkpoint, tmp_path, repo_id, revision, gated, expected):
    server.add_repo(REPO, chat_checkpoint)
    server.add_repo("moonshotai/gated", chat_checkpoint, gated=True)
    with pytest.raises(HubError) as failed:
        hub.pull(repo_id, revision=revision, cache_dir=tmp_path / "hub", endpoint=server.url)
    assert one_line(failed).startswith(expected), str(failed.value)


def test_a_token_opens_a_gated_repo_and_never_reaches_the_cdn(server, chat_checkpoint, tmp_path, monkeypatch):
    server.add_repo("moonshotai/gated", chat_checkpoint, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    path = hub.pull("moonshotai/gated", cache_dir=tmp_path / "hub", endpoint=server.url)
    assert (path / "model.safetensors").is_file()
    hub_requests = [r for r in server.requests if not r.path.startswith("/cdn/")]
    cdn_requests = [r for r in server.requests if r.path.startswith("/cdn/")]
    assert hub_requests and all(r.token == "hf_standin_token" for r in hub_requests)
    assert cdn_requests and all(r.token is None for r in cdn_requests)


def test_not_a_repo_id_or_revision(tmp_path):
    with pytest.raises(HubError, match="not a hub repo id"):
        hub.pull("just-a-name", cache_dir=tmp_path / "hub", endpoint="http://127.0.0.1:9")
    with pytest.raises(HubError, match="is not a revision"):  # refs/<revision> must stay inside the cache
        hub.pull(REPO, revision="../../elsewhere", cache_dir=tmp_path / "hub", endpoint="http://127.0.0.1:9")


def test_pickled_weights_only_are_refused_without_downloading_them(server, chat_checkpoint, tmp_path):
    server.add_repo(
        "someone/pickled",
        {"config.json": (chat_checkpoint / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04 a pickle" * 64},
    )
    with pytest.raises(HubError) as failed:
        hub.pull("someone/pickled", cache_dir=tmp_path / "hub", endpoint=server.url)
    assert "pytorch_model.bin" in one_line(failed) and "never loads pickled weights" in str(failed.value)
    assert server.requests_for("pytorch_model.bin") == []


def test_another_architecture_is_refused_before_its_weights_are_fetched(server, chat_checkpoint, tmp_path):
    config = json.loads((chat_checkpoint / "config.json").read_text())
    config["model_type"] = "llama"
    server.add_repo(
        "someone/llama",
        {
            "config.json": json.dumps(config).encode(),
            "model.safetensors": (chat_checkpoint / "model.safetensors").read_bytes(),
        },
    )
    with pytest.raises(HubError, match="not a Kimi Linear checkpoint") as failed:
        hub.pull("someone/llama", cache_dir=tmp_path / "hub", endpoint=server.url)
    one_line(failed)
    assert server.requests_for("model.safetensors") == []


# -- --model: a path or a repo id -------------------------------------------------------------------


def test_resolve_model_reference(served, chat_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    assert hub.resolve_model_reference(str(chat_checkpoint), cache_dir=cache) == chat_checkpoint
    with pytest.raises(HubError) as failed:
        hub.resolve_model_reference(REPO, cache_dir=cache)
    assert f"run `kimi-desk pull {REPO}` first" in one_line(failed)
    with pytest.raises(HubError) as failed:
        hub.resolve_model_reference(f"{REPO}@v2", cache_dir=cache)
    assert f"kimi-desk pull {REPO} --revision v2" in one_line(failed)
    with pytest.raises(HubError, match="no such file or folder"):
        hub.resolve_model_reference(str(tmp_path / "missing" / "model"), cache_dir=cache)

    path = hub.pull(REPO, cache_dir=cache, endpoint=served.url)
    served.requests.clear()
    assert hub.resolve_model_reference(REPO, cache_dir=cache) == path
    assert hub.resolve_model_reference(f"{REPO}@{path.name}", cache_dir=cache) == path
    assert served.requests == []  # found offline

    assert hub.model_display_name(path) == REPO  # not the commit hash the folder is named after
    assert hub.model_display_name(chat_checkpoint) == chat_checkpoint.name

    (path / "model.safetensors").unlink()
    with pytest.raises(HubError) as failed:
        hub.resolve_model_reference(REPO, cache_dir=cache)
    assert "incomplete (model.safetensors is missing)" in one_line(failed)


# -- memory -----------------------------------------------------------------------------------------


def test_hub_module_stays_light():
    # `kimi-desk --help` and the TUI import the engine; the hub module must not drag textual in.
    import subprocess
    import sys

    code = "import sys, kimi_desk.engine.hub; print('textual' in sys.modules, 'huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_sha256_of_a_pulled_blob_is_its_name(served, tmp_path):
    path = hub.pull(REPO, cache_dir=tmp_path / "hub", endpoint=served.url)
    blob = (path / "model.safetensors").resolve()
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
