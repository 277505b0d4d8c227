"""Build the demo model's training corpus from permissively licensed text that package registries serve.

    python packaging/demo_model/prepare_corpus.py --out build/demo_model/corpus

Sources (SOURCES below): the standard library of the Python running this script (PSF-2.0), and
Debian packages fetched with `apt-get download` and unpacked with `dpkg -x`: the Python
documentation's reST sources (PSF-2.0), Django, Twisted and SQLAlchemy sources (BSD-3-Clause,
Expat), and the PostgreSQL, Django and SQLite manuals (PostgreSQL licence, BSD-3-Clause, public
domain). Copyleft text (the Debian Reference, GPL-2+) comes in only with --include-copyleft, since
the model is shipped under the project's MIT licence.

A document is a group of files of one folder (at most --max-document-chars of text), rendered the
way kimi-desk renders a folder it reads: the folder tree, then one "==> path <==" block per file
(`render_document`). HTML pages become their readable text, named `.txt`, as the model would see
them. Exact duplicates, binaries, files over 1 MiB and minified files are left out, as the reader
leaves them out of a folder.

Output, in --out:
    manifest.json           sources (package, version, sha256 of the .deb, licence), sizes, shards
    licenses/<source>.txt   each source's copyright file, as shipped
    train-00000.jsonl       one document per line: {"id", "source", "license", "root", "files": [{"path", "text"}]}
    heldout-00000.jsonl     documents never trained on, tokenizer included: about --heldout-fraction of
                            the documents, chosen by a hash of their id, so whole groups of modules or
                            manual pages are held out
With --gzip the shards are written as .jsonl.gz (the readers here take either), small enough to carry.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import posixpath
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from kimi_desk.engine.ingest.decoding import decode_text, longest_line_length
from kimi_desk.engine.ingest.file_rules import has_binary_extension, is_generated_name, is_lock_file
from kimi_desk.engine.ingest.html_text import html_to_text
from kimi_desk.engine.ingest.listing import reading_order_key
from kimi_desk.engine.ingest.render import render_file_block, render_folder_preamble

FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "build" / "demo_model" / "corpus"
DEFAULT_WORK = REPO_ROOT / "build" / "demo_model" / "sources"

# A source file this large is generated data, not something a person wrote (the reader's own limit
# for a file inside a folder is 2 MiB; half of that keeps tables and test vectors out).
MAX_FILE_BYTES = 1 << 20
# Minified code and data dumps put whole programs on one line; kimi-desk's reader skips them too.
MAX_LINE_CHARS = 10_000


@dataclass(frozen=True)
class Source:
    """Where a body of text comes from and under which licence.

    `package` is the Debian package holding the files, or None for a folder on this machine
    (`folder` is then absolute). `folder` and `copyright` are paths inside the unpacked package.
    """

    name: str
    root: str
    license: str
    package: str | None
    folder: str
    patterns: tuple[str, ...]
    copyright: str
    exclude: tuple[str, ...] = ()
    html: bool = False
    copyleft: bool = False


def stdlib_source() -> Source:
    stdlib = sysconfig.get_paths()["stdlib"]
    return Source(
        name="cpython-stdlib",
        root="cpython",
        license="PSF-2.0",
        package=None,
        folder=stdlib,
        patterns=("**/*.py",),
        copyright=str(Path(stdlib) / "LICENSE.txt"),
        # Installed third-party packages are not the standard library, and idlelib/turtledemo are
        # GUI programs whose text is mostly widget plumbing.
        exclude=("site-packages/*", "dist-packages/*", "idlelib/*", "turtledemo/*", "lib2to3/tests/data/*"),
    )


DEBIAN_SOURCES = (
    Source(
        "python-docs",
        "python-docs",
        "PSF-2.0",
        "python3.11-doc",
        "usr/share/doc/python3.11/html/_sources",
        ("**/*.rst.txt",),
        "usr/share/doc/python3.11-doc/copyright",
    ),
    Source(
        "django",
        "django",
        "BSD-3-Clause",
        "python3-django",
        "usr/lib/python3/dist-packages/django",
        ("**/*.py",),
        "usr/share/doc/python3-django/copyright",
    ),
    Source(
        "twisted",
        "twisted",
        "MIT",
        "python3-twisted",
        "usr/lib/python3/dist-packages/twisted",
        ("**/*.py",),
        "usr/share/doc/python3-twisted/copyright",
    ),
    Source(
        "sqlalchemy",
        "sqlalchemy",
        "MIT",
        "python3-sqlalchemy",
        "usr/lib/python3/dist-packages/sqlalchemy",
        ("**/*.py",),
        "usr/share/doc/python3-sqlalchemy/copyright",
    ),
    Source(
        "postgresql-docs",
        "postgresql-15-manual",
        "PostgreSQL",
        "postgresql-doc-15",
        "usr/share/doc/postgresql-doc-15/html",
        ("**/*.html",),
        "usr/share/doc/postgresql-doc-15/copyright",
        html=True,
    ),
    Source(
        "django-docs",
        "django-docs",
        "BSD-3-Clause",
        "python-django-doc",
        "usr/share/doc/python-django-doc/html",
        ("**/*.html",),
        "usr/share/doc/python-django-doc/copyright",
        exclude=("_modules/*", "genindex*", "py-modindex*"),
        html=True,
    ),
    Source(
        "sqlite-docs",
        "sqlite-docs",
        "public-domain",
        "sqlite3-doc",
        "usr/share/doc/sqlite3",
        ("**/*.html",),
        "usr/share/doc/sqlite3-doc/copyright",
        html=True,
    ),
    Source(
        "debian-reference",
        "debian-reference",
        "GPL-2.0-or-later",
        "debian-reference-en",
        "usr/share/debian-reference",
        ("*.en.txt.gz",),
        "usr/share/doc/debian-reference-en/copyright",
        copyleft=True,
    ),
)


def default_sources(include_copyleft: bool = False) -> list[Source]:
    return [stdlib_source(), *(s for s in DEBIAN_SOURCES if include_copyleft or not s.copyleft)]


# -- documents -------------------------------------------------------------------------------------


@dataclass
class Document:
    id: str
    source: str
    license: str
    root: str
    files: list[dict] = field(default_factory=list)  # {"path": str, "text": str}

    @property
    def chars(self) -> int:
        return sum(len(f["text"]) for f in self.files)

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "source": self.source, "license": self.license, "root": self.root, "files": self.files},
            ensure_ascii=False,
        )


def document_segments(doc: dict) -> list[str]:
    """The text kimi-desk reads for this document, cut where the session cuts it: the folder tree,
    then one block per file. Each segment ends with a newline and the next starts with "==>", so
    encoding them one by one gives the ids of encoding their concatenation."""
    paths = [f["path"] for f in doc["files"]]
    return [render_folder_preamble(doc["root"], paths)] + [
        render_file_block(f["path"], f["text"]) for f in doc["files"]
    ]


def render_document(doc: dict) -> str:
    return "".join(document_segments(doc))


def is_heldout(doc_id: str, fraction: float) -> bool:
    """A stable choice: the same document is held out on every machine and every run."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _excluded(relative: str, patterns: Iterable[str]) -> bool:
    # fnmatch's "*" also matches "/", so "site-packages/*" covers the whole subtree.
    return "__pycache__" in relative or any(fnmatchcase(relative, pattern) for pattern in patterns)


def source_files(source: Source, folder: Path) -> Iterator[tuple[str, str]]:
    """(path inside the source, text) for every file the source contributes, in kimi-desk's reading
    order. Files the reader would skip in a folder are skipped here too."""
    candidates = []
    for pattern in source.patterns:
        for path in folder.glob(pattern):
            if path.is_file() and not path.is_symlink():
                relative = path.relative_to(folder).as_posix()
                if not _excluded(relative, source.exclude):
                    candidates.append(relative)
    kept = []
    for relative in set(candidates):
        name = posixpath.basename(relative)
        if is_lock_file(name) or is_generated_name(name) or (has_binary_extension(name) and not name.endswith(".gz")):
            continue
        raw = (folder / relative).read_bytes()
        if relative.endswith(".gz"):
            raw = gzip.decompress(raw)
            relative = relative[: -len(".gz")]
        if len(raw) > MAX_FILE_BYTES:
            continue
        decoded = decode_text(raw)
        if decoded is None:
            continue
        text = decoded.text
        if source.html:
            text = html_to_text(text)
            relative = posixpath.splitext(relative)[0] + ".txt"
        if not text.strip() or longest_line_length(text) > MAX_LINE_CHARS:
            continue
        kept.append((relative, text))
    # Sorted by the names the files end up with (pages renamed .txt), as the reader would order them.
    yield from sorted(kept, key=lambda item: reading_order_key(item[0]))


def group_documents(
    source: Source, files: Iterable[tuple[str, str]], max_chars: int, seen: set[str]
) -> Iterator[Document]:
    """Files of one folder, in reading order, cut into documents of at most `max_chars` (a larger file
    is a document by itself). `seen` holds the hashes of texts already taken: exact duplicates (empty
    __init__ files, licence headers copied across packages) are kept once."""
    current: Document | None = None
    current_folder, part = None, 0
    for relative, text in files:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        folder = posixpath.dirname(relative) or "."
        if current is None or folder != current_folder or (current.chars + len(text) > max_chars):
            if current is not None:
                yield current
            part = part + 1 if folder == current_folder else 0
            current_folder = folder
            current = Document(f"{source.name}/{folder}#{part}", source.name, source.license, source.root)
        current.files.append({"path": relative, "text": text})
    if current is not None:
        yield current


# -- fetching --------------------------------------------------------------------------------------


def fetch_debian_package(package: str, work: Path) -> tuple[Path, dict]:
    """Download (once) and unpack a Debian package; its unpacked root and what the manifest says of it."""
    downloads = work / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        result = subprocess.run(["apt-get", "download", package], cwd=downloads, capture_output=True, text=True)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
        if not debs:
            raise SystemExit(
                f"prepare_corpus: could not download {package} with apt-get "
                f"(try `apt-get update` first): {result.stderr.strip().splitlines()[-1:]}"
            )
    deb = debs[-1]
    unpacked = work / "unpacked" / package
    if not unpacked.is_dir():
        temporary = unpacked.with_name(unpacked.name + ".partial")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", str(deb), str(temporary)], check=True)
        temporary.rename(unpacked)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    origin = {
        "debian_package": package,
        "version": version,
        "deb": deb.name,
        "deb_sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
    }
    return unpacked, origin


def locate(source: Source, work: Path) -> tuple[Path, Path, dict]:
    """The source's folder, its copyright file and its origin record (fetching a package if needed)."""
    if source.package is None:
        origin = {"folder": source.folder}
        if source.name == "cpython-stdlib":
            origin["python_version"] = sys.version.split()[0]
        return Path(source.folder), Path(source.copyright), origin
    unpacked, origin = fetch_debian_package(source.package, work)
    return unpacked / source.folder, unpacked / source.copyright, origin


# -- writing ---------------------------------------------------------------------------------------


class ShardWriter:
    """Documents into numbered JSONL shards of about `shard_bytes` each."""

    def __init__(self, out: Path, split: str, shard_bytes: int, compress: bool):
        self.out, self.split, self.shard_bytes, self.compress = out, split, shard_bytes, compress
        self.shards: list[dict] = []
        self._handle = None
        self._bytes = 0

    def _open(self) -> None:
        suffix = ".jsonl.gz" if self.compress else ".jsonl"
        name = f"{self.split}-{len(self.shards):05d}{suffix}"
        path = self.out / name
        # mtime=0 keeps compressed shards byte-identical from one run to the next.
        self._handle = gzip.GzipFile(path, "wb", mtime=0) if self.compress else open(path, "wb")
        self.shards.append({"name": name, "documents": 0, "text_bytes": 0})
        self._bytes = 0

    def write(self, doc: Document) -> None:
        if self._handle is None or self._bytes >= self.shard_bytes:
            self.close()
            self._open()
        line = (doc.to_json() + "\n").encode("utf-8")
        self._handle.write(line)
        self._bytes += len(line)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["text_bytes"] += sum(len(f["text"].encode("utf-8")) for f in doc.files)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            path = self.out / self.shards[-1]["name"]
            self.shards[-1]["file_bytes"] = path.stat().st_size
            self.shards[-1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            self._handle = None


def build_corpus(
    sources: list[Source],
    out: Path,
    work: Path,
    heldout_fraction: float = 0.03,
    max_document_chars: int = 200_000,
    shard_bytes: int = 32 << 20,
    compress: bool = False,
    log=print,
) -> dict:
    """Write shards, licences and the manifest for `sources` into `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("train-*.jsonl*"), *out.glob("heldout-*.jsonl*")]:
        stale.unlink()
    (out / "licenses").mkdir(exist_ok=True)
    writers = {split: ShardWriter(out, split, shard_bytes, compress) for split in ("train", "heldout")}
    seen: set[str] = set()
    source_records = []
    for source in sources:
        folder, copyright_file, origin = locate(source, work)
        if not folder.is_dir():
            raise SystemExit(f"prepare_corpus: {source.name}: {folder} is not a folder")
        license_copy = f"licenses/{source.name}.txt"
        shutil.copyfile(copyright_file, out / license_copy)
        record = {
            "name": source.name,
            "license": source.license,
            "copyleft": source.copyleft,
            **origin,
            "license_file": license_copy,
            "documents": 0,
            "files": 0,
            "text_bytes": 0,
            "heldout_documents": 0,
            "heldout_files": 0,
            "heldout_text_bytes": 0,
        }
        for doc in group_documents(source, source_files(source, folder), max_document_chars, seen):
            split = "heldout" if is_heldout(doc.id, heldout_fraction) else "train"
            writers[split].write(doc)
            prefix = "heldout_" if split == "heldout" else ""
            record[f"{prefix}documents"] += 1
            record[f"{prefix}files"] += len(doc.files)
            record[f"{prefix}text_bytes"] += sum(len(f["text"].encode("utf-8")) for f in doc.files)
        source_records.append(record)
        log(
            f"{source.name}: {record['documents']} train / {record['heldout_documents']} held-out documents, "
            f"{(record['text_bytes'] + record['heldout_text_bytes']) / 1e6:.1f} MB of text ({source.license})"
        )
    for writer in writers.values():
        writer.close()
    if not writers["heldout"].shards:
        log("warning: no document was held out; training needs some (raise --heldout-fraction)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "packaging/demo_model/prepare_corpus.py",
        "heldout_fraction": heldout_fraction,
        "max_document_chars": max_document_chars,
        "sources": source_records,
        "splits": {
            split: {
                "documents": sum(s["documents"] for s in writer.shards),
                "text_bytes": sum(s["text_bytes"] for s in writer.shards),
                "shards": writer.shards,
            }
            for split, writer in writers.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# -- reading (for the other steps) -------------------------------------------------------------------


def read_manifest(corpus: Path) -> dict:
    path = Path(corpus) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no corpus manifest; run packaging/demo_model/prepare_corpus.py first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_documents(corpus: Path, split: str) -> Iterator[dict]:
    """The documents of one split, in shard order. A shard listed as .jsonl may have been gzipped for
    transport since (and the other way round): whichever of the two exists is read."""
    corpus = Path(corpus)
    for shard in read_manifest(corpus)["splits"][split]["shards"]:
        stem = shard["name"].removesuffix(".gz").removesuffix(".jsonl")
        plain, packed = corpus / f"{stem}.jsonl", corpus / f"{stem}.jsonl.gz"
        path = plain if plain.is_file() else packed
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="downloaded and unpacked packages (kept)")
    parser.add_argument(
        "--sources", default=None, help="comma-separated source names (default: every permissive source)"
    )
    parser.add_argument("--include-copyleft", action="store_true", help="also GPL text (the Debian Reference)")
    parser.add_argument("--heldout-fraction", type=float, default=0.03)
    parser.add_argument("--max-document-chars", type=int, default=200_000)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--gzip", action="store_true", help="write .jsonl.gz shards")
    args = parser.parse_args(argv)
    sources = default_sources(args.include_copyleft)
    if args.sources:
        wanted = args.sources.split(",")
        known = {s.name: s for s in [stdlib_source(), *DEBIAN_SOURCES]}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(f"prepare_corpus: unknown source {unknown[0]} (known: {', '.join(known)})")
        sources = [known[name] for name in wanted]
    manifest = build_corpus(
        sources, args.out, args.work, args.heldout_fraction, args.max_document_chars, args.shard_mb << 20, args.gzip
    )
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['documents']} documents, {info['text_bytes'] / 1e6:.1f} MB in {len(info['shards'])} shards"
        )
    print(f"wrote {args.out / 'manifest.json'}")


if __name__ == "__main__":
    main()
