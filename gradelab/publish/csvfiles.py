"""The CSV files people bring back from a spreadsheet or an LMS (rosters, review sheets), and the
one rule for every cell gradelab writes into a CSV.

They come in UTF-8 with or without a BOM (Excel and Canvas write one), and with the `;` or tab
separators that spreadsheets use in locales where the comma is the decimal mark.

Names, ids and comments are other people's text, and a spreadsheet runs a cell that starts with
`=`, `+`, `-`, `@`, tab or CR as a formula (CSV or formula injection). `spreadsheet_text` gives
such a cell a leading apostrophe, as OWASP recommends; numbers, negative ones included, stay
numbers, so LMS score columns still import. `read_records` drops that apostrophe again, so a
sheet gradelab wrote reads back as it was meant.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
from pathlib import Path

from gradelab.errors import GradelabError

DELIMITERS = (",", ";", "\t")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_TEXT_MARK = "'"  # what spreadsheets take for "the rest is text"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def spreadsheet_text(cell: str) -> str:
    """`cell` as a spreadsheet shows it and never runs it: an apostrophe before a formula prefix."""
    if cell.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(cell):
        return _TEXT_MARK + cell
    return cell


def _as_written(cell: str) -> str:
    """The text `spreadsheet_text` was given, for a cell it neutralised."""
    if cell.startswith(_TEXT_MARK) and cell[1:].startswith(FORMULA_PREFIXES):
        return cell[1:]
    return cell


def read_records(path: Path, error: type[GradelabError]) -> list[list[str]]:
    """Every record of the file, blank ones included (so an index + 1 is the spreadsheet row).
    A file that cannot be read or is not UTF-8 raises `error`, naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 ({exc}); save it as 'CSV UTF-8'") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(text))
    return [[_as_written(cell) for cell in record] for record in reader]


def sniff_delimiter(text: str) -> str:
    """The delimiter that gives the first three records one common field count (Canvas's rule);
    a comma when none does."""
    best, best_width = ",", 1
    for delimiter in DELIMITERS:
        records = (row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row)
        widths = {len(row) for row in itertools.islice(records, 3)}
        if len(widths) == 1 and (width := widths.pop()) > best_width:
            best, best_width = delimiter, width
    return best
