"""Turn files into documents: text split into sections that keep their heading path and page.

Every loader raises :class:`LoadError` with a one-line, human message for bad input (empty,
binary, wrongly encoded, corrupt); the pipeline reports it and moves on to the next file.
A BEIR-style ``.jsonl`` corpus yields one document per record, its ``_id`` being the doc_id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# How many bytes we look at to tell text from binary.
SNIFF_BYTES = 8192


class LoadError(Exception):
    """A file that cannot be ingested; str(exc) is the one-line reason shown to the user."""


@dataclass(frozen=True)
class Section:
    text: str
    heading_path: tuple[str, ...] = ()
    page: int | None = None


@dataclass
class Document:
    doc_id: str
    title: str
    kind: str
    sections: list[Section] = field(default_factory=list)
    # record-level problems in multi-document files (a bad line in a .jsonl corpus)
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


MARKDOWN = {".md", ".markdown", ".mdx"}
TEXT = {".txt", ".text"}
RST = {".rst"}
HTML = {".html", ".htm", ".xhtml"}
PDF = {".pdf"}
DOCX = {".docx"}
JSONL = {".jsonl"}
CODE = {
    ".py",
    ".pyi",
    ".js",
    ".mjs",
    ".cjs",
    ".ts",
    ".tsx",
    ".jsx",
    ".go",
    ".rs",
    ".java",
    ".kt",
    ".scala",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".cs",
    ".rb",
    ".php",
    ".swift",
    ".sh",
    ".bash",
    ".sql",
    ".toml",
    ".yaml",
    ".yml",
    ".ini",
    ".cfg",
    ".css",
    ".scss",
    ".vue",
    ".svelte",
    ".lua",
    ".r",
    ".jl",
    ".ex",
    ".exs",
    ".erl",
    ".hs",
    ".ml",
    ".proto",
}
SUPPORTED = MARKDOWN | TEXT | RST | HTML | PDF | DOCX | JSONL | CODE


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED


def load(path: Path, display: str | None = None) -> list[Document]:
    """Load one file. ``display`` is the path shown to users and used as a file's doc_id."""
    display = display or str(path)
    suffix = path.suffix.lower()
    loader = _LOADERS.get(suffix)
    if loader is None:
        # named explicitly on the command line: accept it if it is readable text
        loader = _load_text
    try:
        docs = loader(path, display)
    except LoadError:
        raise
    except PermissionError as exc:
        raise LoadError(f"cannot read: {exc.strerror or 'permission denied'}") from exc
    except OSError as exc:
        raise LoadError(f"cannot read: {exc.strerror or exc}") from exc
    if not docs:
        raise LoadError("no text to index (empty file)")
    return docs


# --- text decoding ---------------------------------------------------------------------------


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise LoadError("empty file")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise LoadError(f"not valid UTF-16 despite its byte-order mark: {exc.reason}") from exc
    if b"\x00" in data[:SNIFF_BYTES]:
        raise LoadError("binary file, not text (contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 and ingest again"
        ) from exc
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise LoadError("empty file")
    return text


# --- markdown-like structure -----------------------------------------------------------------

_ATX = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n(?:---|\.\.\.)\n", re.S)


def split_headings(text: str) -> tuple[str | None, list[Section]]:
    """Split Markdown-ish text at ATX headings (ignoring fenced code). Returns (h1, sections)."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []
    first_h1: str | None = None
    in_fence = False

    def flush() -> None:
        body = "\n".join(buf).strip()
        if body:
            sections.append(Section(body, tuple(h for _, h in stack)))
        buf.clear()

    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            buf.append(line)
            continue
        m = None if in_fence else _ATX.match(line)
        if m is None:
            buf.append(line)
            continue
        flush()
        level, heading = len(m.group(1)), m.group(2).strip()
        if level == 1 and first_h1 is None:
            first_h1 = heading
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
    flush()
    return first_h1, sections


def _load_markdown(path: Path, display: str) -> list[Document]:
    text = read_text(path)
    title = None
    fm = _FRONT_MATTER.match(text)
    if fm:
        text = text[fm.end() :]
        t = re.search(r"^title:\s*['\"]?(.+?)['\"]?\s*$", fm.group(1), re.M)
        title = t.group(1) if t else None
    h1, sections = split_headings(text)
    return _one(display, title or h1 or path.stem, "markdown", sections)


def _load_text(path: Path, display: str) -> list[Document]:
    return _one(display, path.stem, "text", [Section(read_text(path).strip())])


def _load_code(path: Path, display: str) -> list[Document]:
    return _one(display, path.name, "code", [Section(read_text(path).strip())])


_RST_ADORN = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")


def _load_rst(path: Path, display: str) -> list[Document]:
    lines = read_text(path).split("\n")
    styles: list[str] = []  # adornment styles in order of first use: their index is the level
    stack: list[tuple[int, str]] = []
    sections: list[Section] = []
    buf: list[str] = []
    title: str | None = None

    def flush() -> None:
        body = "\n".join(buf).strip()
        if body:
            sections.append(Section(body, tuple(h for _, h in stack)))
        buf.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        over = _RST_ADORN.match(line)
        # overline + title + underline
        if over and i + 2 < len(lines) and _RST_ADORN.match(lines[i + 2]) and lines[i + 1].strip():
            heading, style, i = lines[i + 1].strip(), "o" + line[0], i + 3
        elif (
            line.strip()
            and not over
            and _RST_ADORN.match(nxt)
            and len(nxt.rstrip()) >= len(line.rstrip())
        ):
            heading, style, i = line.strip(), nxt[0], i + 2
        else:
            buf.append(line)
            i += 1
            continue
        flush()
        if style not in styles:
            styles.append(style)
        level = styles.index(style)
        title = title or heading
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
    flush()
    return _one(display, title or path.stem, "rst", sections)


_BLOCK_TAGS = [
    "p",
    "div",
    "section",
    "article",
    "li",
    "ul",
    "ol",
    "pre",
    "blockquote",
    "table",
    "tr",
    "br",
    "hr",
    "dd",
    "dt",
    "figure",
    "figcaption",
    "header",
    "footer",
    "main",
    "aside",
]


def _load_html(path: Path, display: str) -> list[Document]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(read_text(path), "html.parser")
    title_tag = soup.find("title")
    title = title_tag.get_text(" ", strip=True) if title_tag else None
    for tag in soup(["head", "script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    # Rewrite headings as Markdown headings and blocks as paragraph breaks, then reuse the
    # Markdown sectioning: one notion of structure for every format.
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            text = " ".join(h.get_text(" ", strip=True).split())
            h.replace_with(f"\n\n{'#' * level} {text}\n\n" if text else "\n\n")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    for cell in soup.find_all(["td", "th"]):
        cell.insert_after(" | ")
    raw = soup.get_text()
    lines = [" ".join(line.split()) for line in raw.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if not text:
        raise LoadError("no text in this HTML page")
    h1, sections = split_headings(text)
    return _one(display, title or h1 or path.stem, "html", sections)


def _load_pdf(path: Path, display: str) -> list[Document]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if path.stat().st_size == 0:
        raise LoadError("empty file")
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise LoadError("encrypted PDF: decrypt it first")
        pages = [
            (i + 1, (page.extract_text() or "").strip()) for i, page in enumerate(reader.pages)
        ]
        meta_title = (reader.metadata.title if reader.metadata else None) or None
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"corrupt or unreadable PDF: {exc}") from exc
    sections = [Section(text, (), page) for page, text in pages if text]
    if not sections:
        raise LoadError("no extractable text in this PDF (is it a scan without OCR?)")
    return _one(display, str(meta_title).strip() if meta_title else path.stem, "pdf", sections)


def _load_docx(path: Path, display: str) -> list[Document]:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        d = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise LoadError(f"corrupt or unreadable .docx: {exc}") from exc
    lines: list[str] = []
    title = d.core_properties.title or None
    for block in d.element.body.iterchildren():
        tag = block.tag.rsplit("}", 1)[-1]
        if tag == "p":
            para = Paragraph(block, d)
            text = para.text.strip()
            if not text:
                continue
            style = (para.style.name if para.style is not None else "") or ""
            m = re.match(r"Heading (\d)", style)
            if style == "Title":
                title = title or text
                lines.append(f"\n# {text}\n")
            elif m:
                lines.append(f"\n{'#' * min(int(m.group(1)), 6)} {text}\n")
            else:
                lines.append(text + "\n")
        elif tag == "tbl":
            table = Table(block, d)
            for row in table.rows:
                lines.append(" | ".join(c.text.strip() for c in row.cells) + "\n")
    h1, sections = split_headings("\n".join(lines))
    return _one(display, title or h1 or path.stem, "docx", sections)


def _load_jsonl(path: Path, display: str) -> list[Document]:
    """A BEIR-style corpus: one JSON object a line with ``_id``, ``text`` and maybe ``title``."""
    docs: list[Document] = []
    errors: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(_iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {lineno}: invalid JSON ({exc.msg})")
            continue
        if not isinstance(rec, dict):
            errors.append(f"line {lineno}: expected a JSON object")
            continue
        doc_id, text, title = rec.get("_id"), rec.get("text"), rec.get("title") or ""
        if not isinstance(doc_id, str | int) or str(doc_id) == "":
            errors.append(f"line {lineno}: missing '_id'")
            continue
        if not isinstance(text, str) or not isinstance(title, str):
            errors.append(f"line {lineno}: 'text' and 'title' must be strings")
            continue
        doc_id = str(doc_id)
        if doc_id in seen:
            errors.append(f"line {lineno}: duplicate _id {doc_id!r}")
            continue
        if not (text.strip() or title.strip()):
            errors.append(f"line {lineno}: record {doc_id!r} has no text")
            continue
        seen.add(doc_id)
        docs.append(Document(doc_id, title.strip(), "jsonl", [Section(text.strip())]))
    if not docs:
        if errors:
            raise LoadError(f"no valid records; first problem: {errors[0]}")
        raise LoadError("empty file")
    docs[0].errors = errors
    return docs


def _iter_lines(path: Path) -> Iterator[str]:
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
        if b"\x00" in head:
            raise LoadError("binary file, not text (contains NUL bytes)")
        fh.seek(0)
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise LoadError(f"line {lineno}: not valid UTF-8 ({exc.reason})") from exc


def _one(display: str, title: str, kind: str, sections: list[Section]) -> list[Document]:
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        return []
    return [Document(display, title.strip(), kind, sections)]


_LOADERS: dict[str, Callable[[Path, str], list[Document]]] = {
    **dict.fromkeys(MARKDOWN, _load_markdown),
    **dict.fromkeys(TEXT, _load_text),
    **dict.fromkeys(RST, _load_rst),
    **dict.fromkeys(HTML, _load_html),
    **dict.fromkeys(PDF, _load_pdf),
    **dict.fromkeys(DOCX, _load_docx),
    **dict.fromkeys(JSONL, _load_jsonl),
    **dict.fromkeys(CODE, _load_code),
}
