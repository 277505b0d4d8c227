"""EPUB to text with zipfile and ElementTree: container.xml -> OPF -> spine -> XHTML -> text.

Chapters come in spine order (the reading order; the manifest's order is not it), each after a
"[chapter N: title]" line. Archive member paths are resolved against the OPF's folder and any that
would leave the archive ("../") are refused. Nothing is extracted to disk. Books whose chapters are
encrypted (DRM) are refused with a message instead of producing ciphertext.
"""

from __future__ import annotations

import codecs
import io
import posixpath
import re
import zipfile
from dataclasses import dataclass
from urllib.parse import unquote
from xml.etree import ElementTree

from kimi_desk.engine.ingest.html_text import parse_html
from kimi_desk.engine.ingest.records import ExtractedText, IngestError

_CONTAINER_PATH = "META-INF/container.xml"
_ENCRYPTION_PATH = "META-INF/encryption.xml"
_CHAPTER_MEDIA_TYPES = frozenset(
    {
        "application/xhtml+xml",
        "text/html",
        "application/x-dtbook+xml",
        "text/x-oeb1-document",
    }
)
# Font obfuscation is "encryption" in encryption.xml but leaves the text readable.
_FONT_OBFUSCATION_ALGORITHMS = frozenset({"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"})
_MARKUP_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_XML_ENCODING_DECLARATION = re.compile(rb"""^<\?xml[^>]*encoding=["']([A-Za-z0-9._-]+)["']""")


@dataclass(frozen=True)
class _ManifestItem:
    href: str
    media_type: str


@dataclass(frozen=True)
class _Package:
    """What the OPF file says: where it is, the book's metadata, the items and their reading order."""

    folder: str
    title: str
    authors: tuple[str, ...]
    manifest: dict[str, _ManifestItem]
    spine: tuple[str, ...]


def extract_epub_text(data: bytes, max_text_bytes: int) -> ExtractedText:
    """The text of an EPUB in spine order; IngestError when none can be had.

    Error messages are one line and do not name the file: the caller, who knows its path, does.

    `max_text_bytes` bounds what one archive member may decompress to and the book's whole text,
    so a zip bomb stops there.
    """
    archive = _open_archive(data)
    with archive:
        package = _read_package(archive, max_text_bytes)
        _refuse_encrypted_chapters(archive, package, max_text_bytes)
        chapters, warnings = _read_chapters(archive, package, max_text_bytes)
    if not chapters:
        raise IngestError(f"no readable text in the EPUB's {len(package.spine)} spine items")
    return ExtractedText(text=_book_heading(package) + "\n\n".join(chapters) + "\n", warnings=tuple(warnings))


def _open_archive(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise IngestError("damaged or not an EPUB (not a zip archive)") from error


def _read_package(archive: zipfile.ZipFile, max_text_bytes: int) -> _Package:
    container = _parse_xml(archive, _CONTAINER_PATH, max_text_bytes)
    rootfile = next((element for element in container.iter() if _local_name(element.tag) == "rootfile"), None)
    full_path = rootfile.get("full-path") if rootfile is not None else None
    if not full_path:
        raise IngestError(f"damaged EPUB, {_CONTAINER_PATH} names no package file")
    opf_path = _resolve_member_path("", full_path)
    if opf_path is None:
        raise IngestError(f"refused, its package file path {full_path!r} points outside the archive")
    opf = _parse_xml(archive, opf_path, max_text_bytes)
    return _Package(
        folder=posixpath.dirname(opf_path),
        title=_first_text(opf, "title"),
        authors=tuple(_all_texts(opf, "creator")),
        manifest=_manifest(opf),
        spine=tuple(element.get("idref", "") for element in opf.iter() if _local_name(element.tag) == "itemref"),
    )


def _manifest(opf: ElementTree.Element) -> dict[str, _ManifestItem]:
    items = {}
    for element in opf.iter():
        if _local_name(element.tag) == "item" and element.get("id") and element.get("href"):
            items[element.get("id", "")] = _ManifestItem(element.get("href", ""), element.get("media-type", ""))
    return items


def _refuse_encrypted_chapters(archive: zipfile.ZipFile, package: _Package, max_text_bytes: int) -> None:
    if _ENCRYPTION_PATH not in archive.namelist():
        return
    encryption = _parse_xml(archive, _ENCRYPTION_PATH, max_text_bytes)
    chapter_paths = {_resolve_member_path(package.folder, item.href) for item in package.manifest.values()}
    for encrypted in encryption.iter():
        if _local_name(encrypted.tag) != "EncryptedData":
            continue
        algorithm = _first_attribute(encrypted, "EncryptionMethod", "Algorithm")
        uri = _first_attribute(encrypted, "CipherReference", "URI")
        if algorithm not in _FONT_OBFUSCATION_ALGORITHMS and _resolve_member_path("", uri) in chapter_paths:
            raise IngestError("the EPUB is DRM-protected (its chapters are encrypted) and cannot be read")


def _read_chapters(archive: zipfile.ZipFile, package: _Package, max_text_bytes: int) -> tuple[list[str], list[str]]:
    """The spine's documents as text, each after its "[chapter N: title]" line, and warnings about
    spine items that were left out. Items without text (a cover image) get no number."""
    chapters: list[str] = []
    warnings: list[str] = []
    text_bytes = 0
    for position, item_id in enumerate(package.spine, start=1):
        member_path, warning = _spine_member(package, position, item_id)
        markup = _read_member(archive, member_path, max_text_bytes) if member_path else None
        if member_path and markup is None:
            warning = f"spine item {position} ({member_path}) is missing from the archive"
        if warning:
            warnings.append(warning)
        if markup is None:
            continue
        chapter = parse_html(_decode_markup(markup))
        if not chapter.text.strip():
            continue
        title = chapter.first_heading or chapter.title
        number = len(chapters) + 1
        marker = f"[chapter {number}: {title}]" if title else f"[chapter {number}]"
        chapters.append(f"{marker}\n{chapter.text}")
        text_bytes += len(chapters[-1].encode("utf-8"))
        if text_bytes > max_text_bytes:
            raise IngestError(f"refused, the book's text is over the limit of {max_text_bytes} bytes")
    return chapters, warnings


def _spine_member(package: _Package, position: int, item_id: str) -> tuple[str | None, str | None]:
    """The archive member of a spine item if it is a readable document, else None and maybe why."""
    item = package.manifest.get(item_id)
    if item is None:
        return None, f"spine item {position} ({item_id!r}) is not in the manifest"
    if not _is_chapter(item):
        return None, None
    member_path = _resolve_member_path(package.folder, item.href)
    if member_path is None:
        return None, f"spine item {position} refused: {item.href!r} points outside the archive"
    return member_path, None


def _is_chapter(item: _ManifestItem) -> bool:
    """An (X)HTML document; some books leave the media type out, then the extension decides."""
    media_type = item.media_type.split(";", 1)[0].strip().lower()
    if media_type:
        return media_type in _CHAPTER_MEDIA_TYPES
    return item.href.split("#", 1)[0].lower().endswith((".xhtml", ".html", ".htm"))


def _book_heading(package: _Package) -> str:
    lines = []
    if package.title:
        lines.append(f"Title: {package.title}")
    if package.authors:
        lines.append(f"Author: {', '.join(package.authors)}")
    return "\n".join(lines) + "\n\n" if lines else ""


def _resolve_member_path(folder: str, href: str) -> str | None:
    """The archive member an href names (relative to `folder`), or None if it would leave the archive."""
    path = unquote(href.split("#", 1)[0])
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    resolved = posixpath.normpath(posixpath.join(folder, path))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        return None
    return resolved


def _read_member(archive: zipfile.ZipFile, member_path: str, max_text_bytes: int) -> bytes | None:
    """A member's bytes, or None when the archive has no such member."""
    try:
        with archive.open(member_path) as member:
            # Read one byte past the limit: the declared size in the zip directory can lie.
            data = member.read(max_text_bytes + 1)
    except KeyError:
        return None
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as error:
        raise IngestError(f"damaged EPUB, {member_path} cannot be decompressed ({error})") from error
    if len(data) > max_text_bytes:
        raise IngestError(f"refused, {member_path} decompresses to more than {max_text_bytes} bytes")
    return data


def _parse_xml(archive: zipfile.ZipFile, member_path: str, max_text_bytes: int) -> ElementTree.Element:
    data = _read_member(archive, member_path, max_text_bytes)
    if data is None:
        raise IngestError(f"damaged EPUB, {member_path} is missing")
    try:
        # ElementTree resolves no external entities, and Python's expat refuses entity expansion bombs.
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise IngestError(f"damaged EPUB, {member_path} is not well-formed XML ({error})") from error


def _decode_markup(data: bytes) -> str:
    """XHTML bytes as text: BOM first, then the XML declaration's encoding, else UTF-8."""
    for bom, encoding in _MARKUP_BOMS:
        if data.startswith(bom):
            return data[len(bom) :].decode(encoding, errors="replace")
    declared = _XML_ENCODING_DECLARATION.match(data)
    encoding = declared.group(1).decode("ascii") if declared else "utf-8"
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:
        # An encoding Python does not know: UTF-8 with replacement characters beats nothing.
        return data.decode("utf-8", errors="replace")


def _local_name(tag: object) -> str:
    """An element's name without its namespace; comments and processing instructions have none."""
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _first_text(root: ElementTree.Element, local_name: str) -> str:
    return next(iter(_all_texts(root, local_name)), "")


def _all_texts(root: ElementTree.Element, local_name: str) -> list[str]:
    """The whitespace-normalised text of every element named `local_name` that has some."""
    elements = (element for element in root.iter() if _local_name(element.tag) == local_name)
    texts = (" ".join("".join(element.itertext()).split()) for element in elements)
    return [text for text in texts if text]


def _first_attribute(root: ElementTree.Element, local_name: str, attribute: str) -> str:
    """An attribute of the first element named `local_name` under `root`, or ""."""
    return next((element.get(attribute, "") for element in root.iter() if _local_name(element.tag) == local_name), "")
