"""Snapshots of the model state on disk: safetensors for tensors, JSON for metadata, never pickle.

A snapshot folder holds
- checkpoints of the constant-size part (per KDA layer the recurrent matrix and conv window) at chosen
  positions: `kda-<position>-<n>.safetensors`;
- the MLA latent caches, stored once, as append-only segments that end at checkpoint positions:
  `mla-<start>-<end>-<n>.safetensors`; the cache at any checkpoint is the concatenation of the
  segments before it;
- `manifest.json`, the list of both with their checksums. It is replaced atomically after the files it
  names are on disk, so a crash at any moment leaves the previous manifest, and every file it names,
  intact. New files never reuse a name the manifest knows.

A store with a `base` holds what a conversation adds after a document (engine/session.py): its
segments start at `base`, not 0, and it restores on top of the document's state, whose cache it
continues in place. Its checkpoints carry a `key`, a digest of every token before them, so that a
checkpoint is used only for the very conversation it was taken in.

Every file carries the format version and the model's and tokenizer's fingerprints; every tensor file
carries a SHA-256 of its tensor data, checked on load. A snapshot from another model, or a damaged
or truncated file, is refused with a SnapshotError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from kimi_desk.engine.atomic import atomic_write
from kimi_desk.engine.errors import UserError
from kimi_desk.engine.files import BadJSON, brief, first_line, is_count, read_json, some
from kimi_desk.engine.state import KDAState, MLACache, ModelState

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# A manifest holds a few hundred entries; a session file its document's file list and the transcript.
CHECKED_JSON_MAX_BYTES = 64 << 20


class SnapshotError(UserError):
    """A snapshot that cannot be used: damaged, truncated, or from another model or tokenizer."""


# -- atomic files -----------------------------------------------------------------------------------


def _json_with_checksum(payload: dict) -> bytes:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    checksum = hashlib.sha256(body.encode()).hexdigest()
    return (json.dumps({"checksum": checksum, "payload": payload}, sort_keys=True, indent=1) + "\n").encode()


def read_checked_json(path: Path) -> dict:
    """The object in a JSON file written by write_checked_json, with its checksum verified. The checksum
    finds damage, not intent: whoever can write the file can write a matching checksum, so callers
    check what the payload holds before using it."""
    try:
        wrapper = read_json(Path(path), CHECKED_JSON_MAX_BYTES)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: missing") from None
    except BadJSON as exc:
        raise SnapshotError(f"{path}: damaged ({exc})") from None
    return _checked_payload(wrapper, str(path))


def parse_checked_json(data: bytes, where: str) -> dict:
    """The payload of write_checked_json's bytes `data` (a member of an archive); SnapshotError naming
    `where` when they are not that."""
    try:
        wrapper = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise SnapshotError(f"{where}: damaged (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError):
        raise SnapshotError(f"{where}: damaged (not JSON)") from None
    return _checked_payload(wrapper, where)


def _checked_payload(wrapper, where: str) -> dict:
    payload = wrapper.get("payload") if isinstance(wrapper, dict) else None
    if not isinstance(payload, dict) or not isinstance(wrapper.get("checksum"), str):
        raise SnapshotError(f"{where}: damaged (not a payload object with its checksum)")
    try:
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except (RecursionError, ValueError):
        raise SnapshotError(f"{where}: damaged (nested too deeply)") from None
    if hashlib.sha256(body.encode()).hexdigest() != wrapper["checksum"]:
        raise SnapshotError(f"{where}: damaged (checksum mismatch)")
    return payload


def write_checked_json(path: Path, payload: dict) -> None:
    atomic_write(path, _json_with_checksum(payload))


# -- tensor files -----------------------------------------------------------------------------------


def _data_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class Identity:
    """What a snapshot is tied to: snapshots of one model and tokenizer are useless to another."""

    model_fingerprint: str
    tokenizer_fingerprint: str

    def metadata(self) -> dict[str, str]:
        return {
            "format_version": str(FORMAT_VERSION),
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], identity: Identity) -> str:
    """Atomically write a safetensors file that carries its identity and data checksum; returns the checksum."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    digest = _data_digest(cpu)
    atomic_write(path, safetensors_bytes(cpu, metadata={**identity.metadata(), "data_sha256": digest}))
    return digest


def read_tensors(path: Path, identity: Identity, expected_digest: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path.name}: missing from the snapshot")
    try:
        with safe_open(path, framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SnapshotError(f"{path.name}: damaged or truncated ({first_line(exc)})") from None
    _check_identity(path, metadata, identity)
    digest = _data_digest(tensors)
    if digest != metadata.get("data_sha256") or (expected_digest and digest != expected_digest):
        raise SnapshotError(f"{path.name}: damaged (checksum mismatch)")
    return tensors


def _check_identity(path: Path, metadata: dict, identity: Identity) -> None:
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise SnapshotError(
            f"{path.name}: snapshot format {brief(metadata.get('format_version'))}, "
            f"this kimi-desk reads format {FORMAT_VERSION}"
        )
    if metadata.get("model_fingerprint") != identity.model_fingerprint:
        raise SnapshotError(f"{path.name}: the snapshot was made with another model")
    if metadata.get("tokenizer_fingerprint") != identity.tokenizer_fingerprint:
        raise SnapshotError(f"{path.name}: the snapshot was made with another tokenizer")


# -- the store --------------------------------------------------------------------------------------


class SnapshotStore:
    """Checkpoints of one sequence's state (batch size 1) in one folder."""

    def __init__(self, folder: Path, identity: Identity, base: int = 0):
        self.folder = Path(folder)
        self.identity = identity
        self.base = base
        self.folder.mkdir(exist_ok=True)  # never recreates a removed session folder
        self._manifest = self._read_manifest()

    # The manifest: {"checkpoints": [{position, file, sha256[, key]}], "segments": [{start, end, file,
    # sha256}], "counter": n[, "base": b]} (n makes every new file name unique; b is where segments start).
    def _read_manifest(self) -> dict:
        path = self.folder / MANIFEST
        if not path.exists():
            return {
                "format_version": FORMAT_VERSION,
                **self.identity.metadata(),
                "checkpoints": [],
                "segments": [],
                "counter": 0,
                **({"base": self.base} if self.base else {}),
            }
        manifest = read_checked_json(path)
        _check_identity(path, {k: v for k, v in manifest.items() if isinstance(v, str)}, self.identity)
        _check_manifest(path, manifest, self.base)
        return manifest

    def _commit(self) -> None:
        write_checked_json(self.folder / MANIFEST, self._manifest)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Remove tensor files the manifest no longer names (left by truncation or a crash)."""
        named = {c["file"] for c in self._manifest["checkpoints"]} | {s["file"] for s in self._manifest["segments"]}
        for path in self.folder.glob("*.safetensors"):
            if path.name not in named:
                path.unlink(missing_ok=True)
        for path in self.folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def _next_name(self, stem: str) -> str:
        self._manifest["counter"] += 1
        return f"{stem}-{self._manifest['counter']}.safetensors"

    @property
    def positions(self) -> list[int]:
        return [c["position"] for c in self._manifest["checkpoints"]]

    def manifest_bytes(self) -> bytes:
        """The manifest as its file holds it (also for a store that has not written one yet)."""
        return _json_with_checksum(self._manifest)

    @property
    def files(self) -> list[str]:
        """The tensor files the manifest names: the snapshot is these and the manifest, nothing else."""
        return [c["file"] for c in self._manifest["checkpoints"]] + [s["file"] for s in self._manifest["segments"]]

    @property
    def cached_tokens(self) -> int:
        """Where the stored cache ends (`base` when it holds no segment)."""
        segments = self._manifest["segments"]
        return segments[-1]["end"] if segments else self.base

    def key_at(self, position: int) -> str | None:
        entry = next((c for c in self._manifest["checkpoints"] if c["position"] == position), None)
        return entry.get("key") if entry else None

    def position_of(self, key: str) -> int | None:
        """The position of the checkpoint saved with `key`, if there is one."""
        return next((c["position"] for c in self._manifest["checkpoints"] if c.get("key") == key), None)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    def save(self, state: ModelState, key: str | None = None) -> None:
        """Checkpoint `state` at its position: the constant-size part, plus the MLA latents that the
        stored segments do not hold yet. `key` (64 hexadecimal digits) names the tokens before it."""
        if state.batch_size != 1:
            raise ValueError("snapshots hold one sequence (batch size 1)")
        if key is not None and not _is_key(key):
            raise ValueError(f"a checkpoint key is 64 hexadecimal digits, got {key!r}")
        position = state.position
        if position < self.cached_tokens:
            raise ValueError(
                f"cannot checkpoint position {position} behind the stored cache "
                f"({self.cached_tokens} tokens); truncate first"
            )
        if position in self.positions:
            return
        if position > self.cached_tokens:
            start = self.cached_tokens
            latents = {
                f"layers.{i}.latents": layer.latents[0, start:position]
                for i, layer in enumerate(state.layers)
                if isinstance(layer, MLACache)
            }
            name = self._next_name(f"mla-{start:012d}-{position:012d}")
            digest = write_tensors(self.folder / name, latents, self.identity)
            self._manifest["segments"].append({"start": start, "end": position, "file": name, "sha256": digest})
        constant = {}
        for i, layer in enumerate(state.layers):
            if isinstance(layer, KDAState):
                constant[f"layers.{i}.recurrent"] = layer.recurrent[0]
                constant[f"layers.{i}.conv"] = layer.conv[0]
        name = self._next_name(f"kda-{position:012d}")
        digest = write_tensors(self.folder / name, constant, self.identity)
        entry = {"position": position, "file": name, "sha256": digest, **({"key": key} if key else {})}
        self._manifest["checkpoints"].append(entry)
        self._manifest["checkpoints"].sort(key=lambda c: c["position"])
        self._commit()

    def latest_at_or_before(self, position: int) -> int | None:
        earlier = [p for p in self.positions if p <= position]
        return max(earlier) if earlier else None

    def restore(self, position: int, template: ModelState, capacity: int | None = None) -> ModelState:
        """The state at checkpoint `position`, built into copies of `template`'s layers (a fresh
        `model.new_state(1)`, which fixes layer kinds, shapes, dtypes and device). A store with a
        base continues `template`, the state at `base`, instead: its cache rows stay where they are.
        Each MLA cache is sized once (for the segments, or for `capacity` tokens when that is more),
        and the segments are read one at a time into it: memory holds the cache and one segment, and
        nothing is copied twice (appending to a growing cache copied it at every doubling)."""
        entry = next((c for c in self._manifest["checkpoints"] if c["position"] == position), None)
        if entry is None:
            raise SnapshotError(f"no checkpoint at position {position} (have {some(self.positions)})")
        if self.base and template.position != self.base:
            raise ValueError(f"the state to continue is at {template.position}, this store starts at {self.base}")
        constant = read_tensors(self.folder / entry["file"], self.identity, entry["sha256"])
        segments = [s for s in self._manifest["segments"] if s["start"] < position]
        state = template.continuation() if self.base else template.clone()
        caches = [(i, layer) for i, layer in enumerate(state.layers) if isinstance(layer, MLACache)]
        try:
            for i, layer in enumerate(state.layers):
                if isinstance(layer, KDAState):
                    recurrent, conv = constant[f"layers.{i}.recurrent"], constant[f"layers.{i}.conv"]
                    (
                        _check_shape(entry["file"], recurrent, layer.recurrent[0]),
                        _check_shape(entry["file"], conv, layer.conv[0]),
                    )
                    layer.recurrent = recurrent.unsqueeze(0).to(layer.recurrent)
                    layer.conv = conv.unsqueeze(0).to(layer.conv)
            for _, layer in caches:
                layer.truncate(self.base)
                layer.reserve(max(capacity or 0, segments[-1]["end"] if segments else 0))
            for segment in segments:
                part = read_tensors(self.folder / segment["file"], self.identity, segment["sha256"])
                for i, layer in caches:
                    latents = part[f"layers.{i}.latents"]
                    want = (segment["end"] - segment["start"], layer.buffer.shape[-1])
                    if tuple(latents.shape) != want:
                        raise SnapshotError(
                            f"{segment['file']}: layer {i} has latents of shape "
                            f"{list(latents.shape)}, the segment needs {list(want)}"
                        )
                    layer.append(latents.unsqueeze(0).to(layer.buffer))
        except KeyError as exc:
            raise SnapshotError(f"snapshot lacks tensor {exc.args[0]}: made for another model?") from None
        for _, layer in caches:
            layer.truncate(position)
        state.position = position
        return state

    def truncate_after(self, position: int) -> None:
        """Forget every checkpoint after `position` (itself a checkpoint, or the base) and the cache
        beyond it: what re-reading from a changed file needs."""
        if position != self.base and position not in self.positions:
            raise ValueError(f"{position} is not a checkpoint position")
        self._manifest["checkpoints"] = [c for c in self._manifest["checkpoints"] if c["position"] <= position]
        self._manifest["segments"] = [s for s in self._manifest["segments"] if s["end"] <= position]
        self._commit()

    def forget_checkpoints_before(self, position: int) -> None:
        """Drop the checkpoints before `position`, keeping the cache: a conversation keeps only its last
        few (the 48B model's constant-size state is 42 MB a checkpoint)."""
        self._manifest["checkpoints"] = [c for c in self._manifest["checkpoints"] if c["position"] >= position]
        self._commit()


# Tensor file names as the store makes them (`_next_name`): only these are ever read, written or deleted.
_TENSOR_FILE = re.compile(r"(kda-[0-9]{12}|mla-[0-9]{12}-[0-9]{12})-([0-9]{1,18})\.safetensors")


def _is_key(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_manifest(path: Path, manifest: dict, base: int = 0) -> None:
    """The manifest holds what save() writes: checkpoints at distinct positions in order, within the
    cache; segments that tile the cache from `base`; every file a name the store makes, once, numbered
    below the counter, so that no entry makes the store read or delete a file outside its folder or
    write over one it names."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise SnapshotError(f"{path}: damaged ({what})")

    checkpoints, segments = manifest.get("checkpoints"), manifest.get("segments")
    need(isinstance(checkpoints, list) and isinstance(segments, list), "no checkpoint or segment list")
    counter = manifest.get("counter")
    need(is_count(counter), f"counter is {brief(counter)}")
    names = set()
    for kind, entries, prefix, fields in (
        ("checkpoint", checkpoints, "kda", ("position",)),
        ("segment", segments, "mla", ("start", "end")),
    ):
        for entry in entries:
            need(isinstance(entry, dict), f"a {kind} entry is {brief(entry)}")
            for field in fields:
                need(is_count(entry.get(field)), f"a {kind} entry has {field} {brief(entry.get(field))}")
            file = entry.get("file")
            match = _TENSOR_FILE.fullmatch(file) if isinstance(file, str) else None
            need(
                match is not None and file.startswith(prefix) and file not in names and int(match.group(2)) <= counter,
                f"a {kind} entry names the file {brief(file)}",
            )
            names.add(file)
            need(isinstance(entry.get("sha256"), str), f"a {kind} entry has sha256 {brief(entry.get('sha256'))}")
            need("key" not in entry or _is_key(entry["key"]), f"a {kind} entry has key {brief(entry.get('key'))}")
    stored_base = manifest.get("base", 0)
    need(is_count(stored_base) and stored_base == base, f"its cache starts at {brief(stored_base)}, not at {base:,}")
    end = base
    for segment in segments:
        need(segment["start"] == end and segment["end"] > end, "its cache segments do not follow each other")
        end = segment["end"]
    positions = [c["position"] for c in checkpoints]
    need(positions == sorted(set(positions)), "its checkpoints are not in order")
    if positions:
        need(positions[0] >= base, f"a checkpoint at {brief(positions[0])} is before the cache's start")
        need(positions[-1] <= end, f"a checkpoint at {brief(positions[-1])} is past the cache's {brief(end)} tokens")


def _check_shape(file: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise SnapshotError(f"{file}: state of shape {list(got.shape)}, the model needs {list(want.shape)}")
