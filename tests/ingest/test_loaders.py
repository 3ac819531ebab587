from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.loaders import LoadError, load
from tests.builders import make_docx, make_pdf


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_markdown_sections_keep_heading_path(tmp_path: Path) -> None:
    md = write(
        tmp_path / "guide.md",
        "---\ntitle: The Guide\n---\n# Install\nintro text\n\n## Linux\napt steps\n\n"
        "```sh\n# not a heading\nmake run\n```\n\n## macOS\nbrew steps\n# Usage\nrun it\n",
    )
    [doc] = load(md, "guide.md")
    assert doc.title == "The Guide"
    assert doc.doc_id == "guide.md"
    paths = [(s.heading_path, s.text.split("\n")[0]) for s in doc.sections]
    assert paths == [
        (("Install",), "intro text"),
        (("Install", "Linux"), "apt steps"),
        (("Install", "macOS"), "brew steps"),
        (("Usage",), "run it"),
    ]
    assert "# not a heading" in doc.sections[1].text


def test_markdown_title_falls_back_to_h1_then_filename(tmp_path: Path) -> None:
    assert load(write(tmp_path / "a.md", "# Alpha\nbody"))[0].title == "Alpha"
    assert load(write(tmp_path / "beta-notes.md", "just body"))[0].title == "beta-notes"


def test_rst_titles_and_levels(tmp_path: Path) -> None:
    rst = write(
        tmp_path / "faq.rst",
        "===\nFAQ\n===\n\nIntro.\n\nPorts\n-----\n\nIt listens on 8000.\n\nModels\n------\n\n"
        "MiniLM.\n\nDetails\n~~~~~~~\n\nDeep.\n",
    )
    [doc] = load(rst)
    assert doc.title == "FAQ"
    assert [s.heading_path for s in doc.sections] == [
        ("FAQ",),
        ("FAQ", "Ports"),
        ("FAQ", "Models"),
        ("FAQ", "Models", "Details"),
    ]
    assert doc.sections[1].text == "It listens on 8000."


def test_html_drops_scripts_and_keeps_structure(tmp_path: Path) -> None:
    page = write(
        tmp_path / "p.html",
        "<html><head><title>Deploy</title><style>p{}</style></head><body>"
        "<script>alert('x')</script><h1>Deploying</h1><p>Use   a proxy.</p>"
        "<h2>Nginx</h2><ul><li>proxy_buffering off</li><li>upgrade headers</li></ul>"
        "<table><tr><td>a</td><td>b</td></tr></table></body></html>",
    )
    [doc] = load(page)
    assert doc.title == "Deploy"
    text = doc.text()
    assert "alert" not in text and "p{}" not in text
    assert doc.sections[0].heading_path == ("Deploying",)
    assert doc.sections[0].text == "Use a proxy."
    assert doc.sections[1].heading_path == ("Deploying", "Nginx")
    assert "proxy_buffering off" in doc.sections[1].text
    assert "a | b" in doc.sections[1].text


def test_pdf_keeps_page_numbers(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "manual.pdf", ["First page (intro)", "Second page\nmore lines"])
    [doc] = load(pdf)
    assert [s.page for s in doc.sections] == [1, 2]
    assert "First page (intro)" in doc.sections[0].text
    assert "more lines" in doc.sections[1].text


def test_docx_headings_and_tables(tmp_path: Path) -> None:
    path = make_docx(
        tmp_path / "ops.docx", "Operations", [("Backups", ["Nightly at 2am."]), ("Ports", ["8000"])]
    )
    [doc] = load(path)
    assert doc.title == "Operations"
    by_heading = {s.heading_path[-1]: s.text for s in doc.sections}
    assert by_heading["Backups"] == "Nightly at 2am."
    assert "RAG_PORT | 8000" in by_heading["Ports"]


def test_code_and_text(tmp_path: Path) -> None:
    [code] = load(write(tmp_path / "app.py", "def f():\n    return 1\n"))
    assert code.kind == "code" and code.title == "app.py" and "return 1" in code.text()
    [txt] = load(write(tmp_path / "notes.txt", "hello\r\nworld\n"))
    assert txt.text() == "hello\nworld"


def test_beir_jsonl_one_document_per_record(tmp_path: Path) -> None:
    lines = [
        {"_id": "d1", "title": "Aspirin", "text": "Aspirin thins blood.", "metadata": {}},
        {"_id": 42, "title": "", "text": "numeric ids become strings"},
    ]
    path = write(tmp_path / "corpus.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    docs = load(path)
    assert [(d.doc_id, d.title) for d in docs] == [("d1", "Aspirin"), ("42", "")]
    assert docs[0].errors == []


def test_beir_jsonl_bad_records_are_reported_good_ones_kept(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        '{"_id": "a", "text": "fine"}\n{not json}\n{"text": "no id"}\n'
        '{"_id": "a", "text": "dup"}\n',
    )
    docs = load(path)
    assert [d.doc_id for d in docs] == ["a"]
    assert docs[0].errors == [
        "line 2: invalid JSON (Expecting property name enclosed in double quotes)",
        "line 3: missing '_id'",
        "line 4: duplicate _id 'a'",
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.md", b"", "empty file"),
        ("blank.txt", b"  \n\n \t\n", "empty file"),
        ("bin.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file, not text"),
        (
            "latin1.txt",
            "caf\xe9 cr\xe8me".encode("latin-1"),
            "not valid UTF-8 (byte 0xe9 at offset 3)",
        ),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "corrupt or unreadable PDF"),
        ("broken.docx", b"PK\x03\x04 not a zip", "corrupt or unreadable .docx"),
        ("empty.jsonl", b"\n\n", "empty file"),
        ("bad.jsonl", b"{oops}\n", "no valid records; first problem: line 1: invalid JSON"),
        (
            "tags.html",
            b"<html><body><script>x()</script></body></html>",
            "no text in this HTML page",
        ),
    ],
)
def test_bad_files_raise_one_line_errors(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoadError) as info:
        load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_pdf_without_text_is_reported(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "scan.pdf", [""])
    with pytest.raises(LoadError, match="no extractable text"):
        load(pdf)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, where chmod 0 does not stop reads: raise what the OS would.
    path = write(tmp_path / "secret.md", "# hi\nthere")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(LoadError, match="cannot read: Permission denied"):
        load(path)


def test_utf16_with_bom_is_text(tmp_path: Path) -> None:
    path = tmp_path / "u16.txt"
    path.write_bytes("héllo wörld".encode("utf-16"))
    assert load(path)[0].text() == "héllo wörld"
