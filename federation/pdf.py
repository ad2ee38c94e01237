"""A small PDF writer for reports: headings, paragraphs, label/value facts and tables on A4
pages, in the PDF standard fonts (Helvetica, Helvetica-Bold, Courier), with page numbers.

Why our own: a compliance report needs text and tables only, and every PDF library that does
more is a large dependency. The standard 14 fonts need no embedding; text is WinAnsi-encoded
(characters outside it are spelt out or become "?"). Lines are wrapped with the fonts' AFM
widths; words longer than a line (hashes, signatures) break anywhere. Table rows taller than
the rest of a page continue on the next one, under the repeated header. Content streams are
Flate-compressed (zlib); the file ends with a classic cross-reference table whose offsets
point at each object (PDF 1.4, ISO 32000-1 7.5).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

A4 = (595.28, 841.89)
FONTS = {"F1": "Helvetica", "F2": "Helvetica-Bold", "F3": "Courier"}
REGULAR, BOLD, MONO = "F1", "F2", "F3"

# AFM advance widths (1/1000 em) of the printable ASCII characters, 32..126.
_HELVETICA = (
    "278 278 355 556 556 889 667 191 333 333 389 584 278 333 278 278 556 556 556 556 556 556 "
    "556 556 556 556 278 278 584 584 584 556 1015 667 667 722 722 667 611 778 722 278 500 667 "
    "556 833 722 778 667 778 722 667 611 722 667 944 667 667 611 278 278 278 469 556 333 556 "
    "556 500 556 556 278 556 556 222 222 500 222 833 556 556 556 556 333 500 278 556 500 722 "
    "500 500 500 334 260 334 584"
)
_HELVETICA_BOLD = (
    "278 333 474 556 556 889 722 238 333 333 389 584 278 333 278 278 556 556 556 556 556 556 "
    "556 556 556 556 333 333 584 584 584 611 975 722 722 722 722 667 611 778 722 278 556 722 "
    "611 833 722 778 667 778 722 667 611 722 667 944 667 667 611 333 278 333 584 556 333 556 "
    "611 556 611 556 333 611 611 278 278 556 278 889 611 611 611 611 389 556 333 611 556 778 "
    "556 556 500 389 280 389 584"
)
WIDTHS = {
    REGULAR: [int(w) for w in _HELVETICA.split()],
    BOLD: [int(w) for w in _HELVETICA_BOLD.split()],
}
# Characters reports use that WinAnsi lacks, spelt out.
_SPELL = str.maketrans(
    {
        "ε": "epsilon",
        "δ": "delta",
        "→": "->",
        "≤": "<=",
        "≥": ">=",
        "−": "-",
        "✓": "yes",
        "\t": "    ",
    }
)


def encode(text: str) -> bytes:
    """Text as WinAnsi bytes (what the standard fonts' /WinAnsiEncoding maps)."""
    return text.translate(_SPELL).encode("cp1252", errors="replace")


def text_width(text: str, font: str, size: float) -> float:
    """Width of a line of text in points."""
    if font == MONO:
        return 0.6 * size * len(encode(text))
    table = WIDTHS[font]
    return sum(table[c - 32] if 32 <= c <= 126 else 556 for c in encode(text)) * size / 1000.0


def wrap(text: str, width: float, font: str, size: float) -> list[str]:
    """Break text into lines no wider than ``width``: at spaces, or anywhere inside a word
    longer than a line. Newlines in the text start new lines."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, font, size) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while text_width(word, font, size) > width:
                cut = len(word) - 1
                while cut > 1 and text_width(word[:cut], font, size) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _literal(data: bytes) -> bytes:
    """A PDF literal string: parentheses and backslashes escaped."""
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


@dataclass
class Column:
    """A table column: its heading and its share of the table's width."""

    heading: str
    share: float = 1.0
    font: str = REGULAR


@dataclass
class _Page:
    ops: list[bytes] = field(default_factory=list)


class PdfDocument:
    """Flowing text on A4 pages; ``to_bytes`` writes the file."""

    def __init__(
        self, title: str, *, author: str = "Quorum", margin: float = 50.0, footer: str = ""
    ) -> None:
        self.title = title
        self.author = author
        self.footer = footer
        self.width, self.height = A4
        self.margin = margin
        self.pages: list[_Page] = []
        self.y = 0.0
        self._new_page()

    @property
    def text_width(self) -> float:
        return self.width - 2 * self.margin

    def _new_page(self) -> None:
        self.pages.append(_Page())
        self.y = self.height - self.margin

    def _room(self, needed: float) -> None:
        """Start a new page unless ``needed`` points fit above the bottom margin."""
        if self.y - needed < self.margin + 14:  # keep the footer line free
            self._new_page()

    def _text(self, x: float, y: float, line: str, font: str, size: float) -> None:
        self.pages[-1].ops.append(
            b"BT /%s %.2f Tf %.2f %.2f Td %s Tj ET"
            % (font.encode(), size, x, y, _literal(encode(line)))
        )

    def _rule(self, x1: float, y: float, x2: float, gray: float = 0.75) -> None:
        self.pages[-1].ops.append(
            b"%.2f G 0.5 w %.2f %.2f m %.2f %.2f l S 0 G" % (gray, x1, y, x2, y)
        )

    def heading(self, text: str, level: int = 1) -> None:
        """A bold heading; kept on the page of what follows it (needs room for 3 lines)."""
        size = {1: 16.0, 2: 12.5}.get(level, 11.0)
        lines = wrap(text, self.text_width, BOLD, size)
        self.y -= 6 if level == 1 else 10
        self._room(len(lines) * size * 1.25 + 3 * 12)
        for line in lines:
            self.y -= size * 1.2
            self._text(self.margin, self.y, line, BOLD, size)
        self.y -= 4

    def paragraph(self, text: str, *, font: str = REGULAR, size: float = 9.5) -> None:
        """Wrapped text; a page break may fall between its lines."""
        leading = size * 1.3
        for line in wrap(text, self.text_width, font, size):
            self._room(leading)
            self.y -= leading
            self._text(self.margin, self.y, line, font, size)
        self.y -= 4

    def facts(self, rows: list[tuple[str, str]], *, size: float = 9.5) -> None:
        """Label/value pairs in two columns (labels in bold); values may use ``MONO`` if they
        look like hashes (no spaces, 32+ characters)."""
        labels = max((text_width(label, BOLD, size) for label, _ in rows), default=0.0)
        label_w = min(labels + 12, self.text_width * 0.35)
        leading = size * 1.3
        for label, value in rows:
            value = str(value)
            font = MONO if (" " not in value and len(value) >= 32) else REGULAR
            value_lines = wrap(value, self.text_width - label_w, font, size - (font == MONO))
            label_lines = wrap(label, label_w - 8, BOLD, size)
            for i in range(max(len(value_lines), len(label_lines))):
                self._room(leading)
                self.y -= leading
                if i < len(label_lines):
                    self._text(self.margin, self.y, label_lines[i], BOLD, size)
                if i < len(value_lines):
                    self._text(
                        self.margin + label_w, self.y, value_lines[i], font, size - (font == MONO)
                    )
        self.y -= 4

    def table(
        self, columns: list[Column], rows: list[list[str]], *, size: float = 8.5, empty: str = ""
    ) -> None:
        """A table with a bold header row, repeated on every page the table spans."""
        total = sum(c.share for c in columns)
        widths = [self.text_width * c.share / total for c in columns]
        leading = size * 1.3
        pad = 4.0

        def cell_lines(text: str, i: int, font: str) -> list[str]:
            return wrap(str(text), widths[i] - pad, font, size)

        def draw_line(cells: list[list[str]], k: int, fonts: list[str]) -> None:
            self.y -= leading
            x = self.margin
            for i, lines in enumerate(cells):
                if k < len(lines) and lines[k]:
                    self._text(x, self.y, lines[k], fonts[i], size)
                x += widths[i]

        header = [cell_lines(c.heading, i, BOLD) for i, c in enumerate(columns)]
        header_h = max(len(h) for h in header) * leading + 3

        def draw_header() -> None:
            for k in range(max(len(h) for h in header)):
                draw_line(header, k, [BOLD] * len(columns))
            self.y -= 2
            self._rule(self.margin, self.y, self.margin + self.text_width, gray=0.3)

        self._room(header_h + leading * 2)
        draw_header()
        if not rows and empty:
            rows = [[empty] + [""] * (len(columns) - 1)]
        fonts = [c.font for c in columns]
        for row in rows:
            cells = [cell_lines(value, i, fonts[i]) for i, value in enumerate(row)]
            height = max(len(c) for c in cells)
            k = 0
            while k < height:
                if self.y - leading < self.margin + 14:
                    self._new_page()
                    draw_header()
                fit = int((self.y - self.margin - 14) // leading)
                for line in range(k, min(height, k + fit)):
                    draw_line(cells, line, fonts)
                k += fit
            self.y -= 2
            self._rule(self.margin, self.y, self.margin + self.text_width)
        self.y -= 6

    def to_bytes(self) -> bytes:
        """The whole file: catalog, page tree, fonts, info, then each page and its content."""
        now = datetime.now(UTC).strftime("D:%Y%m%d%H%M%SZ")
        n_pages = len(self.pages)
        # Object numbers: 1 catalog, 2 pages, 3-5 fonts, 6 info, then page i: 7+2i, content 8+2i.
        objects: list[bytes] = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [%s] /Count %d >>"
            % (b" ".join(b"%d 0 R" % (7 + 2 * i) for i in range(n_pages)), n_pages),
        ]
        for base in FONTS.values():
            objects.append(
                b"<< /Type /Font /Subtype /Type1 /BaseFont /%s /Encoding /WinAnsiEncoding >>"
                % base.encode()
            )
        objects.append(
            b"<< /Title %s /Author %s /Producer (Quorum) /CreationDate (%s) >>"
            % (_literal(encode(self.title)), _literal(encode(self.author)), now.encode())
        )
        fonts = b" ".join(b"/%s %d 0 R" % (name.encode(), 3 + i) for i, name in enumerate(FONTS))
        for i, page in enumerate(self.pages):
            footer = f"{self.footer}    page {i + 1} of {n_pages}".strip()
            ops = [
                *page.ops,
                b"0.35 g BT /F1 7.5 Tf %.2f %.2f Td %s Tj ET 0 g"
                % (self.margin, self.margin - 20, _literal(encode(footer))),
            ]
            stream = zlib.compress(b"\n".join(ops))
            objects.append(
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.2f %.2f] "
                b"/Resources << /Font << %s >> >> /Contents %d 0 R >>"
                % (self.width, self.height, fonts, 8 + 2 * i)
            )
            objects.append(
                b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream"
                % (len(stream), stream)
            )
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(len(out))
            out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
        xref = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
        for offset in offsets:
            out += b"%010d 00000 n \n" % offset
        out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
            len(objects) + 1,
            xref,
        )
        return bytes(out)
