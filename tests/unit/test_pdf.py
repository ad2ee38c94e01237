"""federation.pdf: the files it writes are well-formed PDF and say what they were given."""

from __future__ import annotations

from federation.pdf import BOLD, MONO, REGULAR, Column, PdfDocument, text_width, wrap
from tests.pdf_reading import page_text, pypdf_text, read_pdf


def test_wrap_keeps_lines_within_the_width_and_loses_no_character() -> None:
    text = "a " * 40 + "0123456789abcdef" * 8 + " tail"
    lines = wrap(text, 120, REGULAR, 10)
    assert all(text_width(line, REGULAR, 10) <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert wrap("one\ntwo", 500, BOLD, 10) == ["one", "two"]


def test_text_with_pdf_syntax_and_non_ascii_reads_back_as_written() -> None:
    doc = PdfDocument("Escapes (and) \\ backslashes")
    doc.heading("Privacy (ε spent) — per silo")
    doc.paragraph(r"a (paren) and a \ backslash; café; ε = 1.5; 3 → 4")
    data = doc.to_bytes()

    pages, runs = read_pdf(data)
    text = page_text(runs)
    assert pages == 1
    assert "Privacy (epsilon spent) — per silo" in text
    assert r"a (paren) and a \ backslash; café; epsilon = 1.5; 3 -> 4" in text
    assert "page 1 of 1" in text


def test_a_long_table_breaks_over_pages_and_repeats_its_header() -> None:
    doc = PdfDocument("Long table", footer="Long table")
    doc.heading("Rows")
    rows = [[str(i), f"silo-{i}", "x" * 150] for i in range(120)]
    doc.table([Column("#", 0.4), Column("Silo", 1.0), Column("Data", 3.0, MONO)], rows)
    data = doc.to_bytes()

    pages, runs = read_pdf(data)
    assert pages > 3
    headers = {r.page for r in runs if r.text == "Silo" and r.font == BOLD}
    assert headers == set(range(1, pages + 1))  # the header on every page of the table
    silos = [r.text for r in runs if r.text.startswith("silo-")]
    assert silos == [f"silo-{i}" for i in range(120)]  # every row once, in order
    for r in runs:  # nothing drawn into the margins
        assert 50 - 0.01 <= r.x and 30 - 0.01 <= r.y <= 841.89 - 50
    assert f"page {pages} of {pages}" in page_text(runs)
    extracted = pypdf_text(data)
    if extracted is not None:  # an independent reader agrees
        assert "silo-119" in extracted and "Long table" in extracted


def test_a_row_taller_than_a_page_continues_on_the_next() -> None:
    doc = PdfDocument("Tall row")
    doc.table([Column("Key"), Column("Value", 3.0)], [["tall", "\n".join(map(str, range(150)))]])

    pages, runs = read_pdf(doc.to_bytes())
    assert pages >= 2
    assert [r.text for r in runs if r.text.isdigit()] == [str(i) for i in range(150)]
