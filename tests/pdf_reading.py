"""Read back the PDFs federation.pdf writes, independently of it: check the file's structure
(header, cross-reference offsets, trailer, page tree) and extract each page's text runs.

Written from the PDF specification (ISO 32000-1 7.5, 9.4), not from our writer's code, so a
writer that drifts from the format fails here. When pypdf is installed, ``pypdf_text`` reads the
same file with it too.
"""

from __future__ import annotations

import importlib.util
import io
import re
import zlib
from dataclasses import dataclass


@dataclass
class TextRun:
    """One Tj: where it starts on its page, its font and its text."""

    page: int
    x: float
    y: float
    font: str
    text: str


def _unescape(raw: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x5C:  # backslash
            i += 1
            nxt = raw[i : i + 1]
            mapping = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"(": b"(", b")": b")", b"\\": b"\\"}
            out += mapping.get(nxt, nxt)
        else:
            out.append(c)
        i += 1
    return out.decode("cp1252")


TEXT_OBJECT = re.compile(
    rb"BT /(F\d) ([\d.]+) Tf ([\d.-]+) ([\d.-]+) Td \(((?:\\.|[^\\)])*)\) Tj ET", re.S
)


def read_pdf(data: bytes) -> tuple[int, list[TextRun]]:
    """The number of pages and every text run, checking the structure on the way."""
    assert data.startswith(b"%PDF-1."), data[:16]
    assert data.rstrip().endswith(b"%%EOF")
    start = int(re.findall(rb"startxref\s+(\d+)\s+%%EOF", data)[-1])
    assert data[start:].startswith(b"xref"), "startxref does not point at the xref table"
    head = re.match(rb"xref\s+0 (\d+)\s+", data[start:])
    assert head is not None
    count = int(head.group(1))
    entries = data[start + head.end() : start + head.end() + 20 * count]
    offsets: dict[int, int] = {}
    for number in range(count):
        entry = entries[20 * number : 20 * number + 20]
        assert re.fullmatch(rb"\d{10} \d{5} [nf] ?\r?\n", entry), (number, entry)
        if entry[17:18] == b"n":
            offsets[number] = int(entry[:10])
    objects: dict[int, bytes] = {}
    for number, offset in offsets.items():
        assert data[offset:].startswith(b"%d 0 obj" % number), f"xref: object {number} misplaced"
        end = data.index(b"endobj", offset)
        body = data[offset + len(b"%d 0 obj" % number) : end]
        if b"stream" in body:  # the stream's /Length decides where it ends, not a search
            length = int(re.search(rb"/Length (\d+)", body).group(1))
            begin = data.index(b"stream", offset) + len(b"stream")
            begin += 2 if data[begin : begin + 2] == b"\r\n" else 1
            raw = data[begin : begin + length]
            assert data[begin + length :].lstrip().startswith(b"endstream")
            body = zlib.decompress(raw) if b"/FlateDecode" in body else raw
        objects[number] = body
    trailer = data[data.rindex(b"trailer") :]
    assert int(re.search(rb"/Size (\d+)", trailer).group(1)) == count
    root = int(re.search(rb"/Root (\d+) 0 R", trailer).group(1))
    pages_ref = int(re.search(rb"/Pages (\d+) 0 R", objects[root]).group(1))
    tree = objects[pages_ref]
    kids = [
        int(k) for k in re.findall(rb"(\d+) 0 R", re.search(rb"/Kids \[(.*?)\]", tree).group(1))
    ]
    assert int(re.search(rb"/Count (\d+)", tree).group(1)) == len(kids)
    runs: list[TextRun] = []
    for page_number, kid in enumerate(kids, start=1):
        page = objects[kid]
        assert b"/Type /Page" in page and b"/MediaBox" in page
        for font_ref in re.findall(rb"/F\d (\d+) 0 R", page):
            assert b"/BaseFont" in objects[int(font_ref)]
        content = objects[int(re.search(rb"/Contents (\d+) 0 R", page).group(1))]
        for m in TEXT_OBJECT.finditer(content):
            runs.append(
                TextRun(
                    page_number,
                    float(m.group(3)),
                    float(m.group(4)),
                    m.group(1).decode(),
                    _unescape(m.group(5)),
                )
            )
    return len(kids), runs


def page_text(runs: list[TextRun]) -> str:
    """Every text run, one per line, in order."""
    return "\n".join(r.text for r in runs)


def column_text(runs: list[TextRun], x: float) -> str:
    """The runs that start at ``x`` (a table column), joined without separators: what a value
    broken over several lines was."""
    return "".join(r.text for r in runs if abs(r.x - x) < 0.01)


def pypdf_text(data: bytes) -> str | None:
    """The text pypdf extracts, or None when pypdf is not installed."""
    if importlib.util.find_spec("pypdf") is None:
        return None
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data), strict=True)
    return "\n".join(page.extract_text() for page in reader.pages)
