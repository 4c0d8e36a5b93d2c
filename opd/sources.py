"""Where rows come from: a file, a `save_to_disk` folder or `hf:NAME[:SPLIT]`, read with `datasets`.

Arrow, memory-mapped: a million-row file costs no RAM until a batch is read. A JSON file Arrow
cannot type (a column that is a string in one row and a list in another) or a line that does not
parse is read by hand with `json`, which names the line. `Table` says how to name a row in an error:
`line N` for JSONL and CSV (as an editor shows it), `row N` (0-based) for the others.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class Table:
    """Rows of one source, a `datasets.Dataset` (memory-mapped Arrow) or a list of dicts, with how to name a row."""

    def __init__(self, rows, label: str, kind: str, line_numbers: Sequence[int] | None = None):
        self.rows, self.label, self.kind, self.line_numbers = rows, label, kind, line_numbers

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[int(i)]

    @functools.cached_property
    def columns(self) -> list[str]:
        if hasattr(self.rows, "column_names"):
            return list(self.rows.column_names)
        return sorted({k for row in self.rows for k in row})

    def batches(self, size: int = 8192) -> Iterator[list[dict]]:
        if hasattr(self.rows, "with_format"):  # Arrow batches to Python in C++: 3x faster than row by row
            for batch in self.rows.with_format("arrow").iter(batch_size=size):
                yield batch.to_pylist()
        else:
            for start in range(0, len(self.rows), size):
                yield self.rows[start:start + size]

    def where(self, i: int) -> str:
        """`line N` for JSONL and CSV (1-based, as an editor shows it), `row N` (0-based) for the others."""
        if self.kind == "jsonl":
            return f"line {self.line_numbers[i] if self.line_numbers else i + 1}"
        if self.kind == "csv":
            return f"line {i + 2}"  # after the header line, if no field holds a newline
        return f"row {i}"


def jsonl_line_numbers(path: Path) -> list[int]:
    """The line number of each non-blank line (what `datasets` counts as rows)."""
    with path.open("rb") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def read_json_by_hand(path: Path) -> Table:
    """JSON rows Arrow cannot type (a column that is a string in one row and a list in another): parsed
    with `json`, naming the line of a line that does not parse."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file") from None
        kind, lines = "json", None
    else:
        rows, lines, kind = [], [], "jsonl"
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
            lines.append(n)
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if not isinstance(rows, list) or bad is not None:
        where = f"{path}:{lines[bad]}" if lines else f"{path}: row {bad}"
        raise ValueError(f"{where}: expected a JSON object per row (a JSON array of objects, or one object a line)")
    return Table(rows, str(path), kind, lines)


def read_table(source: str) -> Table:
    """The rows of `source`: a file, a `save_to_disk` folder, or `hf:NAME[:SPLIT]` from the local cache."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file Arrow cannot type is read by hand, quietly
    if source.startswith("hf:"):
        name, _, split = source.removeprefix("hf:").partition(":")
        try:
            with offline():
                rows = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # no network here: a dataset that is not cached cannot be found
            raise ValueError(f"data={source!r}: {name!r} (split {split or 'train'!r}) is not in the local Hugging Face "
                             f"cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}); download it once with "
                             f"`datasets.load_dataset({name!r})` where there is a network, or give a file") from None
        return Table(rows, source, "hf")
    path = Path(source)
    if path.is_dir():
        try:
            rows = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"data={source!r} is a folder but not one saved by Dataset.save_to_disk ({e})") from None
        if isinstance(rows, datasets.DatasetDict):
            raise ValueError(f"data={source!r} holds several splits ({', '.join(rows)}); name one: {source}/{next(iter(rows))}")
        return Table(rows, source, "folder")
    if not path.is_file():
        raise ValueError(f"data={source!r}: no such file or folder; give a .jsonl, .json, .parquet or .csv file, a "
                         f"save_to_disk folder, or hf:NAME[:SPLIT]")
    if path.suffix not in FORMATS:
        raise ValueError(f"data={source!r}: unknown file type {path.suffix!r}; accepted: {', '.join(FORMATS)}, a "
                         f"save_to_disk folder, or hf:NAME[:SPLIT]")
    try:
        extra = {"features": csv_as_text(path)} if path.suffix == ".csv" else {}
        rows = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train", **extra)
    except Exception as e:
        if FORMATS[path.suffix] != "json":
            raise ValueError(f"data={source!r}: cannot read it as {path.suffix} ({type(e).__name__}: "
                             f"{str(e.__cause__ or e).splitlines()[0][:200]})") from None
        return read_json_by_hand(path)  # mixed column types, or a line that does not parse: found by hand
    kind = "jsonl" if path.suffix == ".jsonl" else FORMATS[path.suffix]
    return Table(rows, source, kind, jsonl_line_numbers(path) if kind == "jsonl" and _has_blank_lines(path) else None)


def csv_as_text(path: Path):
    """Every CSV column read as text: an answer "007" or "3.50" stays what the file says."""
    import csv

    import datasets

    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _has_blank_lines(path: Path) -> bool:
    with path.open("rb") as f:
        return any(not line.strip() for line in f)


class offline:
    """`datasets` offline for one call (HF_HUB_OFFLINE is read once, at import time, into its config)."""

    def __enter__(self):
        import datasets

        self.before = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        import datasets

        datasets.config.HF_HUB_OFFLINE = self.before
