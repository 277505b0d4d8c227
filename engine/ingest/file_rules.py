"""Which files a folder's reading leaves out by name, and which reader a file goes to.

Name rules apply only inside folders: a file the user opened by name is always tried.
"""

from __future__ import annotations

import posixpath

from kimi_desk.engine.ingest.records import SourceKind

# Folders of dependencies, caches and other version-control systems: never the user's own text,
# and often many thousands of files. Skipped even when git tracks them.
IGNORED_FOLDER_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".bzr",
        "node_modules",
        "bower_components",
        "__pycache__",
        ".venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".gradle",
    }
)

# Dependency lock files: machine-written, long, and they say nothing a manifest does not.
LOCK_FILE_NAMES = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "bun.lock",
        "bun.lockb",
        "deno.lock",
        "Cargo.lock",
        "poetry.lock",
        "uv.lock",
        "Pipfile.lock",
        "pdm.lock",
        "pixi.lock",
        "conda-lock.yml",
        "composer.lock",
        "Gemfile.lock",
        "go.sum",
        "flake.lock",
        "mix.lock",
        "pubspec.lock",
        "Podfile.lock",
        "Package.resolved",
        "packages.lock.json",
        "gradle.lockfile",
        "Cartfile.resolved",
        "shard.lock",
        "paket.lock",
        "MODULE.bazel.lock",
    }
)

# Suffixes of files that tools write: minified bundles and source maps.
GENERATED_SUFFIXES = (
    ".min.js",
    ".min.mjs",
    ".min.cjs",
    ".min.css",
    ".js.map",
    ".mjs.map",
    ".cjs.map",
    ".css.map",
)

# Formats that are binary by definition; checked by name so that large ones are never read.
BINARY_EXTENSIONS = frozenset(
    {
        # images
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".bmp",
        ".ico",
        ".icns",
        ".webp",
        ".tif",
        ".tiff",
        ".psd",
        ".heic",
        ".avif",
        # audio and video
        ".mp3",
        ".wav",
        ".flac",
        ".ogg",
        ".m4a",
        ".aac",
        ".mp4",
        ".m4v",
        ".mov",
        ".avi",
        ".mkv",
        ".webm",
        # archives and packages
        ".zip",
        ".tar",
        ".gz",
        ".tgz",
        ".bz2",
        ".xz",
        ".zst",
        ".7z",
        ".rar",
        ".jar",
        ".war",
        ".whl",
        ".egg",
        ".deb",
        ".rpm",
        ".dmg",
        ".iso",
        ".apk",
        # compiled code and libraries
        ".o",
        ".a",
        ".so",
        ".dylib",
        ".dll",
        ".exe",
        ".bin",
        ".class",
        ".pyc",
        ".pyo",
        ".wasm",
        ".lib",
        ".obj",
        # fonts
        ".ttf",
        ".otf",
        ".woff",
        ".woff2",
        ".eot",
        # data and model files
        ".sqlite",
        ".sqlite3",
        ".db",
        ".npy",
        ".npz",
        ".pt",
        ".ckpt",
        ".safetensors",
        ".onnx",
        ".gguf",
        ".parquet",
        ".arrow",
        ".feather",
        ".h5",
        ".hdf5",
        ".pkl",
        ".pickle",
        # office documents (zip or OLE containers this reader does not open)
        ".doc",
        ".docx",
        ".xls",
        ".xlsx",
        ".ppt",
        ".pptx",
        ".odt",
        ".ods",
        ".odp",
    }
)

_KIND_BY_EXTENSION = {
    ".pdf": SourceKind.PDF,
    ".epub": SourceKind.EPUB,
    ".md": SourceKind.MARKDOWN,
    ".markdown": SourceKind.MARKDOWN,
    ".html": SourceKind.HTML,
    ".htm": SourceKind.HTML,
    ".xhtml": SourceKind.HTML,
}


def kind_for_name(name: str, inside_folder: bool) -> SourceKind:
    """The reader for a file name.

    HTML inside a folder is read as source text: in a code repository the markup is what the user
    asks about. An HTML file opened by itself is taken as a document and turned into readable text.
    """
    kind = _KIND_BY_EXTENSION.get(posixpath.splitext(name)[1].lower(), SourceKind.TEXT)
    if kind is SourceKind.HTML and inside_folder:
        return SourceKind.TEXT
    return kind


def is_lock_file(name: str) -> bool:
    return name in LOCK_FILE_NAMES


def is_generated_name(name: str) -> bool:
    return name.lower().endswith(GENERATED_SUFFIXES)


def has_binary_extension(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in BINARY_EXTENSIONS
