"""Reading the CSV files people bring back from a spreadsheet or an LMS: rosters and review sheets.

They come in UTF-8 with or without a BOM (Excel and Canvas write one), and with the `;` or tab
separators that spreadsheets use in locales where the comma is the decimal mark.
"""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

from gradelab.errors import GradelabError

DELIMITERS = (",", ";", "\t")


def read_records(path: Path, error: type[GradelabError]) -> list[list[str]]:
    """Every record of the file, blank ones included (so an index + 1 is the spreadsheet row).
    A file that cannot be read or is not UTF-8 raises `error`, naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 ({exc}); save it as 'CSV UTF-8'") from None
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=sniff_delimiter(text)))


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
