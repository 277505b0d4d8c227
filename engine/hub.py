"""Checkpoints from the Hugging Face hub, and the memory check before loading one.

`pull` downloads the files a checkpoint folder needs (kimi-linear-spec.md §1-2: config.json, safetensors,
the tokenizer) into huggingface-hub's own cache, so `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`
and `HF_HUB_OFFLINE` mean what they mean everywhere else. Pickled weights (*.bin, *.pt, ...) and Python
files are never fetched: kimi-desk loads only safetensors and never runs code from a checkpoint.

Downloads resume across runs. huggingface-hub (2.x) retries a dropped connection within one call with a
Range request, but throws the partial file away when the call fails, which for a 5 GB shard means
starting it again after every Ctrl-C. So each file is streamed here into `blobs/<etag>.incomplete` (the
name older huggingface-hub versions resumed from) with huggingface-hub's own `http_get`, checked against
the hub's listed sha256 (LFS) or git blob id, renamed to `blobs/<etag>`, and `hf_hub_download` then links
it into the snapshot exactly as it would have itself. A branch's ref is written last, so a cached
snapshot that a ref points to is a complete one.

Every request waits at most `hub_timeout()` seconds (KIMI_DESK_HUB_TIMEOUT, default 10) for the hub to
connect, to answer, or to send the next piece of a download; a hub that accepts the connection and then
says nothing ends the pull with a line saying what it was waiting for, instead of a pull that never ends.

`estimate_memory` / `check_memory` say, before any weight is read, whether the model fits where it is
about to be loaded, and if not what would fit.

Never imports textual; huggingface_hub and torch are imported only by the functions that need them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kimi_desk import environment
from kimi_desk.engine.config import KimiLinearConfig
from kimi_desk.engine.errors import CheckpointError, ConfigError, UserError
from kimi_desk.engine.files import first_line, index_shards
from kimi_desk.engine.memory import format_bytes


class HubError(UserError):
    """The hub cannot give us the checkpoint (unreachable, unknown repo, gated, offline, ...). One line."""


# -- what a checkpoint folder needs -----------------------------------------------------------------

# Top-level files fetched when the repository has them. Weights are added from the index (or
# model.safetensors); nothing else is ever fetched.
METADATA_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "generation_config.json",
    "tokenizer.json",
    "tiktoken.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Refused even if an index names them: pickles (unpickling runs code) and code itself.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".py", ".pyc", ".so")

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
DEFAULT_REVISION = "main"


def is_repo_id(text: str) -> bool:
    """`owner/name` as the hub spells repo ids (no '..', no '--' at the ends, at most 96 characters)."""
    return (
        bool(_REPO_ID.fullmatch(text))
        and ".." not in text
        and len(text) <= 96
        and not any(part.endswith(("-", ".")) for part in text.split("/"))
    )


def _check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise HubError(
            f"{repo_id!r} is not a hub repo id (expected owner/name, e.g. moonshotai/Kimi-Linear-48B-A3B-Instruct)"
        )


def _check_revision(revision: str) -> None:
    # A revision becomes a path under refs/ in the cache; it must stay there.
    if not revision or ".." in revision.split("/") or revision.startswith("/") or "\\" in revision:
        raise HubError(f"{revision!r} is not a revision (a branch, tag or commit, e.g. main)")


def _is_refused(filename: str) -> bool:
    return filename.lower().endswith(REFUSED_SUFFIXES)


@dataclass
class PullProgress:
    """What `pull` reports as it goes; bytes and files count those already in the cache as done."""

    repo_id: str
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current_file: str = ""


# -- waiting for the hub ----------------------------------------------------------------------------

# huggingface-hub's own default; a slow link may want more, and the tests want less.
DEFAULT_HUB_TIMEOUT = 10.0
HUB_TIMEOUT_ENV = environment.HUB_TIMEOUT


def hub_timeout() -> float:
    """Seconds every request of a pull waits to connect, for an answer, or for the next bytes of a
    download: KIMI_DESK_HUB_TIMEOUT when set (read here only), else 10."""
    text = environment.hub_timeout_text()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:  # NaN fails too
        raise HubError(f"{HUB_TIMEOUT_ENV}={text[:40]!r}: expected a number of seconds above 0 (at most a day)")
    return seconds


@contextmanager
def _download_timeout(seconds: float):
    """huggingface-hub's `http_get` takes no timeout argument: it reads HF_HUB_DOWNLOAD_TIMEOUT from its
    constants at each call (each retry too), so the constant is set for the pull."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = previous


# -- errors -----------------------------------------------------------------------------------------


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _hub_error(
    exc: BaseException, repo_id: str, revision: str, endpoint: str | None, doing: str, timeout: float
) -> HubError | None:
    """The one-line HubError for an exception of huggingface-hub or its HTTP client, or None if it is
    neither (a bug, which must keep its traceback). `doing` says what the call was for ("listing X's
    files"), for a hub that stops answering."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = _endpoint(endpoint)
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError, its base class
        return HubError(f"{repo_id} is gated: accept its terms at {hub}/{repo_id}, then {login}")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r} on the hub")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such model on the hub ({hub}); check the name, or if it is private, {login}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{repo_id}: a file the hub listed is missing ({first_line(exc)})")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return HubError(f"not authorized to download {repo_id} (HTTP {status}); {login}")
        return HubError(f"the hub ({hub}) answered HTTP {status} for {repo_id}; try again later")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return HubError(
            f"{repo_id} is not in the hub cache and downloads are off (HF_HUB_OFFLINE); "
            "unset HF_HUB_OFFLINE to download it"
        )
    if isinstance(exc, httpx2.TimeoutException):
        return HubError(
            f"the hub at {hub} did not answer within {timeout:g} s while {doing}; check the network, "
            f"or set HF_ENDPOINT to a mirror, or {HUB_TIMEOUT_ENV} to wait longer"
        )
    if isinstance(
        exc,
        (
            httpx2.ConnectError,
            httpx2.NetworkError,
            httpx2.ProxyError,
            httpx2.RemoteProtocolError,
            httpx2.UnsupportedProtocol,
        ),
    ):
        return HubError(
            f"cannot reach the Hugging Face hub at {hub} ({first_line(exc)}); check the network, "
            "or set HF_ENDPOINT to a mirror, or pass a local folder with --model"
        )
    if isinstance(exc, httpx2.HTTPError):
        return HubError(f"talking to the hub at {hub} failed ({first_line(exc)}); try again")
    return None


class _HubCalls:
    """Turns huggingface-hub's exceptions into one-line HubErrors (everything else passes through)."""

    def __init__(self, repo_id: str, revision: str, endpoint: str | None, doing: str, timeout: float):
        self.repo_id, self.revision, self.endpoint = repo_id, revision, endpoint
        self.doing, self.timeout = doing, timeout

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, HubError):
            return False
        mapped = _hub_error(exc, self.repo_id, self.revision, self.endpoint, self.doing, self.timeout)
        if mapped is None:
            return False
        raise mapped from None


# -- the cache --------------------------------------------------------------------------------------


def _cache_root(cache_dir) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()


def _storage_folder(cache_dir: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def missing_checkpoint_part(folder: Path) -> str | None:
    """The first file a checkpoint folder lacks (config.json, the index's shards, model.safetensors),
    or None when it is complete enough to load."""
    if not (folder / "config.json").is_file():
        return "config.json"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = index_shards(index)
        except (OSError, CheckpointError):
            return None  # a damaged index is load_model's to report, with the file named
        return next((s for s in shards if not (folder / s).is_file()), None)
    return None if (folder / "model.safetensors").is_file() else "model.safetensors"


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir=None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (branch, tag or commit), found without
    touching the network; None when the cache has no such snapshot.

    Read from the cache layout directly (refs/<revision> holds the commit, snapshots/<commit> the files)
    rather than through `snapshot_download(local_files_only=True)`: that one calls a snapshot incomplete
    when another tool cached the repository's full file list, and a pull never fetches every file."""
    revision = revision or DEFAULT_REVISION
    _check_revision(revision)
    storage = _storage_folder(_cache_root(cache_dir), repo_id)
    commit = revision if _COMMIT_HASH.fullmatch(revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / revision).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
    snapshot = storage / "snapshots" / commit
    return snapshot if _COMMIT_HASH.fullmatch(commit) and snapshot.is_dir() else None


def _complete_cached_snapshot(repo_id: str, revision: str | None, cache_dir) -> Path | None:
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is None:
        return None
    missing = missing_checkpoint_part(snapshot)
    if missing is not None:
        raise HubError(
            f"the cached copy of {repo_id} is incomplete ({missing} is missing); "
            f"run `kimi-desk pull {repo_id}` to complete it"
        )
    return snapshot


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """refs/<branch or tag> -> commit, atomically, in huggingface-hub's format (the bare hash)."""
    if revision == commit:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text() == commit:
        return
    tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


# -- downloading one file, resumably ----------------------------------------------------------------


class _ChecksumWriter:
    """A file object for `http_get` that hashes what it writes, so a file is verified without being
    read again; follows `http_get`'s truncation when a server ignores a Range request."""

    def __init__(self, fh, new_hasher: Callable[[], "hashlib._Hash"]):
        self._fh = fh
        self._new_hasher = new_hasher
        self._rehash()

    def _rehash(self) -> None:
        self._fh.flush()
        end = self._fh.tell()
        self.hasher = self._new_hasher()
        with open(self._fh.name, "rb") as existing:
            remaining = end
            while remaining > 0:
                block = existing.read(min(remaining, 16 << 20))
                if not block:
                    break
                self.hasher.update(block)
                remaining -= len(block)

    def write(self, data) -> int:
        self._fh.write(data)
        self.hasher.update(data)
        return len(data)

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        result = self._fh.truncate(size)
        self._fh.seek(0, os.SEEK_END)
        self._rehash()
        return result

    def flush(self) -> None:
        self._fh.flush()


def _expected_digest(sibling, size: int | None):
    """(hasher factory, hex digest the hub lists) for a file, or None when the listing has neither an
    LFS sha256 nor a git blob id."""
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None and getattr(lfs, "sha256", None):
        return hashlib.sha256, lfs.sha256
    blob_id = getattr(sibling, "blob_id", None)
    if blob_id and size is not None and re.fullmatch(r"[0-9a-f]{40}", blob_id):

        def git_blob_hasher():
            # A git blob id is sha1 over "blob <size>\0" followed by the content.
            hasher = hashlib.sha1()
            hasher.update(b"blob %d\0" % size)
            return hasher

        return git_blob_hasher, blob_id
    return None


def _progress_bar_class(report: Callable[[int], None]):
    """A stand-in for tqdm that `http_get` accepts: it reports this file's bytes done. `http_get` passes
    `initial` (bytes resumed) and may update by a negative amount when it restarts a file."""

    class FileProgress:
        def __init__(self, *args, initial: int = 0, **kwargs):
            self.done = initial
            report(self.done)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n: int | float | None = 1) -> None:
            self.done += int(n or 0)
            report(self.done)

        def close(self) -> None:
            pass

    return FileProgress


def _download_blob(
    url: str, blob: Path, filename: str, size: int | None, sibling, report: Callable[[int], None], timeout: float
) -> None:
    """Stream `url` into blob + '.incomplete', resuming from what is there, verify it, rename it."""
    import httpx2
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(blob.name + ".incomplete")
    partial.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and partial.is_file() and partial.stat().st_size > size:
        partial.unlink()  # longer than the file can be: not a prefix of it
    # The token goes to the hub only: the HTTP client drops it when the hub redirects to its CDN.
    headers = build_hf_headers()
    # Resuming means byte offsets into the file itself, never into a compressed stream.
    headers["Accept-Encoding"] = "identity"
    digest = _expected_digest(sibling, size)
    with open(partial, "ab") as fh:
        resumed = fh.tell()
        writer = _ChecksumWriter(fh, digest[0]) if digest else fh
        try:
            http_get(
                url,
                writer,
                resume_size=resumed,
                headers=headers,
                expected_size=size,
                displayed_filename=filename,
                tqdm_class=_progress_bar_class(report),
            )
        except BaseException as exc:
            fh.flush()
            done = fh.tell()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            response = getattr(exc, "response", None)
            reason = f"HTTP {response.status_code}" if response is not None else first_line(exc)
            if isinstance(exc, httpx2.TimeoutException):
                reason = f"the hub sent nothing for {timeout:g} s; {HUB_TIMEOUT_ENV} sets how long to wait"
            if size is not None and done > size:
                partial.unlink(missing_ok=True)
            of = f"/{size:,}" if size is not None else ""
            raise HubError(
                f"download of {filename} stopped at {done:,}{of} bytes ({reason}); run the same command again to resume"
            ) from None
        fh.flush()
        os.fsync(fh.fileno())
    if digest is not None and writer.hasher.hexdigest() != digest[1]:
        partial.unlink(missing_ok=True)
        raise HubError(
            f"{filename} does not match the checksum the hub lists (the partial download was "
            "damaged and is deleted); run the same command again"
        )
    os.replace(partial, blob)


def _fetch(
    repo_id: str,
    filename: str,
    commit: str,
    sibling,
    cache_dir: Path,
    endpoint: str | None,
    report: Callable[[int], None],
    timeout: float,
) -> Path:
    """One file of the snapshot at `commit`, from the cache when it is there."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import WeakFileLock

    storage = _storage_folder(cache_dir, repo_id)
    pointer = storage / "snapshots" / commit / filename
    if pointer.is_file():
        return pointer
    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    with _HubCalls(repo_id, commit, endpoint, f"asking for {filename}", timeout):
        meta = get_hf_file_metadata(url, endpoint=endpoint, timeout=timeout)
    if not meta.etag or "/" in meta.etag or meta.etag.startswith("."):
        raise HubError(f"the hub gave no usable ETag for {repo_id}/{filename}; is HF_ENDPOINT a hub?")
    size = meta.size if meta.size is not None else getattr(sibling, "size", None)
    blob = storage / "blobs" / meta.etag
    lock = cache_dir / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if not blob.is_file():
        # Another pull of the same file (another terminal) waits here instead of writing the same partial.
        with WeakFileLock(str(lock)):
            if not blob.is_file():
                # The resolve url, not the signed CDN url the HEAD saw: every request of a long
                # download (each retry, each resumed run) is redirected afresh, so no signature expires.
                _download_blob(url, blob, filename, size, sibling, report, timeout)
    # huggingface-hub links the snapshot entry to the blob (a symlink, or a copy where there are none).
    with _HubCalls(repo_id, commit, endpoint, f"asking for {filename}", timeout):
        return Path(
            hf_hub_download(
                repo_id, filename, revision=commit, cache_dir=cache_dir, endpoint=endpoint, etag_timeout=timeout
            )
        )


# -- pull -------------------------------------------------------------------------------------------


def _weight_files(folder: Path, listed: dict, repo_id: str) -> list[str]:
    """The safetensors files the checkpoint is made of: the shards its index names, else model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = index_shards(index)
        except CheckpointError as exc:
            raise HubError(f"{repo_id}: {index.name}{str(exc).removeprefix(str(index))}") from None
        for shard in shards:
            if shard not in listed:
                raise HubError(f"{repo_id}: the index names {shard}, which the repository does not have")
        return shards
    if "model.safetensors" in listed:
        return ["model.safetensors"]
    pickles = sorted(f for f in listed if "/" not in f and _is_refused(f) and not f.endswith((".py", ".pyc", ".so")))
    if pickles:
        raise HubError(
            f"{repo_id} has no safetensors weights, only {pickles[0]}: kimi-desk never loads pickled "
            "weights (loading them can run code)"
        )
    raise HubError(f"{repo_id} has no model.safetensors or model.safetensors.index.json at its top level")


def pull(
    repo_id: str,
    revision: str | None = None,
    cache_dir=None,
    on_progress: Callable[[PullProgress], None] | None = None,
    *,
    endpoint: str | None = None,
) -> Path:
    """Download the checkpoint `repo_id` (at `revision`, default main) into the hub cache and return its
    snapshot folder, ready for `load_model`. Files already cached are not fetched again; an interrupted
    file resumes where it stopped. `endpoint` overrides HF_ENDPOINT. With HF_HUB_OFFLINE=1 the cached
    snapshot is returned, or a HubError says it is not there. Each request waits at most `hub_timeout()`."""
    timeout = hub_timeout()
    with _quiet_hub_warnings(), _download_timeout(timeout):
        return _pull(repo_id, revision, cache_dir, on_progress, endpoint, timeout)


@contextmanager
def _quiet_hub_warnings():
    """huggingface-hub logs each retry of a dropped connection as a warning on stderr; the progress bar
    and the one-line error say what matters. A user's HF_HUB_VERBOSITY still wins."""
    import huggingface_hub.file_download  # noqa: F401 - configures its loggers on import; before the change

    hub_logger = logging.getLogger("huggingface_hub")
    previous = hub_logger.level
    if not environment.hub_verbosity_set():
        hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(previous)


def _pull(repo_id: str, revision: str | None, cache_dir, on_progress, endpoint: str | None, timeout: float) -> Path:
    from huggingface_hub import HfApi, constants

    _check_repo_id(repo_id)
    revision = revision or DEFAULT_REVISION
    _check_revision(revision)
    cache = _cache_root(cache_dir)
    storage = _storage_folder(cache, repo_id)

    if constants.is_offline_mode():
        snapshot = _complete_cached_snapshot(repo_id, revision, cache)
        if snapshot is None:
            raise HubError(
                f"HF_HUB_OFFLINE is set and {repo_id} (revision {revision}) is not in the hub cache "
                f"({cache}); unset HF_HUB_OFFLINE to download it"
            )
        return snapshot

    with _HubCalls(repo_id, revision, endpoint, f"listing {repo_id}'s files", timeout):
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
    commit = info.sha
    if not commit:
        raise HubError(f"the hub did not say which commit {repo_id}@{revision} is; is HF_ENDPOINT a hub?")
    listed = {s.rfilename: s for s in (info.siblings or [])}
    if "config.json" not in listed:
        raise HubError(f"{repo_id} has no config.json at its top level: not a Kimi Linear checkpoint")

    def sizes(names):
        return {name: (listed[name].lfs.size if listed[name].lfs else listed[name].size) or 0 for name in names}

    # The small files first: a repository that is not a Kimi Linear checkpoint is refused before
    # gigabytes of weights are fetched.
    metadata = [name for name in METADATA_FILES if name in listed]
    for name in metadata:
        _fetch(repo_id, name, commit, listed[name], cache, endpoint, lambda done: None, timeout)
    snapshot = storage / "snapshots" / commit
    try:
        KimiLinearConfig.from_file(snapshot / "config.json")
    except ConfigError as exc:
        raise HubError(f"{repo_id} is not a Kimi Linear checkpoint kimi-desk can run ({exc})") from None

    weights = _weight_files(snapshot, listed, repo_id)
    plan = metadata + weights
    size_of = sizes(plan)
    total = sum(size_of.values())
    done_files = {name for name in plan if (snapshot / name).is_file()}
    done_bytes = sum(size_of[name] for name in done_files)

    to_fetch = total - done_bytes
    free = shutil.disk_usage(cache).free  # exists: the small files are in it
    if to_fetch > free:
        raise HubError(
            f"{repo_id} needs {format_bytes(to_fetch)} more on disk, {cache} has {format_bytes(free)} free; "
            "set HF_HUB_CACHE to a larger disk"
        )

    def report(current: str, file_bytes: int) -> None:
        if on_progress is not None:
            on_progress(PullProgress(repo_id, done_bytes + file_bytes, total, len(done_files), len(plan), current))

    report("", 0)
    for name in weights:
        if name in done_files:
            continue
        _fetch(
            repo_id,
            name,
            commit,
            listed[name],
            cache,
            endpoint,
            lambda file_bytes, name=name: report(name, file_bytes),
            timeout,
        )
        done_files.add(name)
        done_bytes += size_of[name]
        report(name, 0)
    missing = missing_checkpoint_part(snapshot)
    if missing is not None:
        raise HubError(f"{repo_id}: {missing} is still missing after the download; run the same command again")
    _write_ref(storage, revision, commit)
    return snapshot


def resolve_model_reference(ref: str, cache_dir=None) -> Path:
    """What `--model` names: an existing path as it is; else `owner/name` (or `owner/name@revision`) as
    its snapshot in the hub cache, found offline. Anything else is a one-line HubError."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    repo_id, _, revision = ref.partition("@")
    if not is_repo_id(repo_id):
        raise HubError(f"{ref}: no such file or folder")
    snapshot = _complete_cached_snapshot(repo_id, revision or None, cache_dir)
    if snapshot is None:
        pull_command = f"kimi-desk pull {repo_id}" + (f" --revision {revision}" if revision else "")
        raise HubError(
            f"{ref}: no such folder, and the hub model {repo_id} is not downloaded yet; run `{pull_command}` first"
        )
    return snapshot


def model_display_name(path) -> str:
    """A name to show for a model folder: `owner/name` for a snapshot in the hub cache (whose folder
    name is a commit hash), else the folder's own name."""
    path = Path(path)
    storage = path.parent.parent
    if path.parent.name == "snapshots" and storage.name.startswith("models--"):
        return storage.name.removeprefix("models--").replace("--", "/", 1)
    return path.name or str(path)


__all__ = [
    "HubError",
    "PullProgress",
    "pull",
    "resolve_model_reference",
    "cached_snapshot",
    "is_repo_id",
    "missing_checkpoint_part",
    "model_display_name",
]
