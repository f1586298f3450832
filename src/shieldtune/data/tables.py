"""Labelled text tables: the in-memory dataset type and a CSV / JSONL / JSON loader.

A :class:`Dataset` is a list of :class:`Example` (text, optional second text, integer label
0..K-1) plus the names of the K labels. :func:`load_table` reads a file and maps its columns
onto that shape; every problem with the file is a :class:`~shieldtune.errors.DataError` whose
message names the file, the row or column, and what would have been accepted.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shieldtune.errors import DataError

__all__ = ["Example", "Dataset", "TableFormat", "load_table"]

TableFormat = Literal["auto", "csv", "jsonl", "json"]
"""File formats :func:`load_table` reads (``auto`` picks one from the file suffix)."""

_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Attributes:
        text: The (first) input text.
        label: Class index in ``0..K-1`` of the owning :class:`Dataset`.
        text_pair: The second text of a pair task (question pair, question + context), or None.
    """

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class Dataset:
    """A labelled text dataset.

    Attributes:
        examples: The examples, in file order unless a split or subset reordered them.
        label_names: Name of each class; ``label_names[i]`` names label ``i``.
        name: Where the data came from (a built-in dataset name or the file stem). Splits and
            subsets keep the name, so it can select per-dataset defaults such as prompts.

    Raises:
        DataError: A label is out of range for ``label_names``.
    """

    examples: list[Example]
    label_names: list[str]
    name: str

    def __post_init__(self) -> None:
        k = len(self.label_names)
        for i, ex in enumerate(self.examples):
            if not 0 <= ex.label < k:
                raise DataError(
                    f"dataset {self.name!r}: example {i} has label {ex.label}, "
                    f"outside 0..{k - 1} ({k} label names)"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def labels(self) -> list[int]:
        """Return the label of every example, in order.

        Returns:
            One class index per example.
        """
        return [ex.label for ex in self.examples]

    @property
    def num_labels(self) -> int:
        """Number of classes K (the length of ``label_names``)."""
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """Whether the examples carry a second text (a text-pair task)."""
        return any(ex.text_pair is not None for ex in self.examples)


def load_table(
    path: str | Path,
    *,
    text: str,
    label: str,
    text_pair: str | None = None,
    format: TableFormat = "auto",
    label_names: list[str] | None = None,
    name: str | None = None,
    fieldnames: Sequence[str] | None = None,
) -> Dataset:
    """Load a labelled text table from CSV, JSON Lines or JSON, mapping its columns.

    CSV files have a header row unless ``fieldnames`` names the columns. JSONL files hold one
    object per line; JSON files hold a list of objects, or an object whose values are the
    records (``{"id": {...}, ...}``). A text cell holding a list of strings is joined with
    spaces (e.g. a list of abstract sections).

    Labels may be strings or integers. Without ``label_names`` the distinct values are mapped to
    ``0..K-1`` in sorted order (numerically when every value is an integer, so ``2 < 10``) and
    their string forms become the label names. With ``label_names`` each value must equal one
    of the names; integer values that match no name are read as indices into ``label_names``
    (so a 0/1 column can be named ``["dissimilar", "similar"]``).

    Args:
        path: The file to read.
        text: Column holding the (first) text.
        label: Column holding the label.
        text_pair: Column holding the second text of a pair task, if any.
        format: ``csv``, ``jsonl``, ``json``, or ``auto`` to pick from the suffix
            (``.csv``, ``.jsonl``/``.ndjson``, ``.json``).
        label_names: The class names, in label-index order; None to derive them from the file.
        name: Dataset name; defaults to the file stem.
        fieldnames: Column names of a CSV file that has no header row.

    Returns:
        The dataset, in file order.

    Raises:
        DataError: The file is missing, unreadable or empty; a column is unknown (the message
            lists the available ones); a text or label cell is empty (the message gives the
            row); a label is not among ``label_names``.
    """
    path = Path(path)
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {str(path)!r} {where}")
    fmt = _resolve_format(path, format)
    records = _read_records(path, fmt, fieldnames)
    if not records:
        raise DataError(f"data file {str(path)!r} is empty (no data rows)")

    available = _columns(records)
    wanted = [("text", text), ("label", label)]
    if text_pair is not None:
        wanted.append(("text_pair", text_pair))
    for role, column in wanted:
        if column not in available:
            raise DataError(
                f"data file {str(path)!r} has no column {column!r} (asked for as {role}); "
                f"available columns: {', '.join(repr(c) for c in available)}"
            )

    texts: list[str] = []
    pairs: list[str | None] = []
    raw_labels: list[Any] = []
    for row_no, (line_no, rec) in enumerate(records, start=1):
        where = f"data file {str(path)!r}, row {row_no}"
        if fmt != "json":
            where += f" (line {line_no})"
        texts.append(_text_cell(rec, text, where))
        pairs.append(_text_cell(rec, text_pair, where) if text_pair is not None else None)
        value = rec.get(label)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: label column {label!r} is empty")
        if isinstance(value, (list, dict, float)) and not _is_integral(value):
            raise DataError(
                f"{where}: label column {label!r} holds {value!r}; accepted: a string or an integer"
            )
        raw_labels.append(int(value) if isinstance(value, float) else value)

    names, indices = _map_labels(raw_labels, label_names, path, label)
    examples = [
        Example(text=t, label=i, text_pair=p) for t, p, i in zip(texts, pairs, indices, strict=True)
    ]
    return Dataset(examples=examples, label_names=names, name=name or path.stem)


def _resolve_format(path: Path, format: str) -> str:
    if format == "auto":
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {str(path)!r} from its suffix {path.suffix!r}; "
                f"accepted suffixes: {', '.join(_SUFFIX_FORMATS)}, or pass format="
                "'csv' | 'jsonl' | 'json'"
            )
        return fmt
    if format not in ("csv", "jsonl", "json"):
        raise DataError(
            f"unknown table format {format!r} for {str(path)!r}; "
            "accepted: 'auto', 'csv', 'jsonl', 'json'"
        )
    return format


def _read_records(
    path: Path, fmt: str, fieldnames: Sequence[str] | None
) -> list[tuple[int, dict[str, Any]]]:
    """Read the rows as ``(line number, record)`` pairs."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc}") from exc
    if fmt == "csv":
        return _read_csv(path, raw, fieldnames)
    if fieldnames is not None:
        raise DataError(f"fieldnames is only for CSV files without a header, not {fmt} ({path})")
    if fmt == "jsonl":
        return _read_jsonl(path, raw)
    return _read_json(path, raw)


def _read_csv(
    path: Path, raw: str, fieldnames: Sequence[str] | None
) -> list[tuple[int, dict[str, Any]]]:
    lines = raw.splitlines(keepends=True)
    reader = csv.DictReader(lines, fieldnames=list(fieldnames) if fieldnames else None)
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        header = reader.fieldnames  # reads the header row, if any
        if not header:
            return []
        if len(set(header)) != len(header):
            dupes = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"data file {str(path)!r} repeats column name(s) {dupes}")
        for rec in reader:
            if not any((v or "").strip() for k, v in rec.items() if k is not None):
                continue  # a blank line
            if None in rec:  # more cells than columns
                raise DataError(
                    f"data file {str(path)!r}, line {reader.line_num}: "
                    f"{len(header) + len(rec[None])} cells but {len(header)} columns"
                )
            records.append((reader.line_num, rec))
    except csv.Error as exc:
        raise DataError(f"data file {str(path)!r} is not valid CSV: {exc}") from exc
    return records


def _read_jsonl(path: Path, raw: str) -> list[tuple[int, dict[str, Any]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {str(path)!r}, line {line_no}: not valid JSON ({exc.msg})"
            ) from exc
        if not isinstance(rec, dict):
            raise DataError(
                f"data file {str(path)!r}, line {line_no}: expected a JSON object, "
                f"got {type(rec).__name__}"
            )
        records.append((line_no, rec))
    return records


def _read_json(path: Path, raw: str) -> list[tuple[int, dict[str, Any]]]:
    if not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"data file {str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from exc
    if isinstance(data, dict):
        items = list(data.values())
    elif isinstance(data, list):
        items = data
    else:
        raise DataError(
            f"data file {str(path)!r}: expected a list of objects or an object of objects, "
            f"got {type(data).__name__}"
        )
    records: list[tuple[int, dict[str, Any]]] = []
    for i, rec in enumerate(items, start=1):
        if not isinstance(rec, dict):
            raise DataError(
                f"data file {str(path)!r}: record {i} is a {type(rec).__name__}, expected an object"
            )
        records.append((i, rec))
    return records


def _columns(records: list[tuple[int, dict[str, Any]]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        for key in rec:
            if key is not None:
                seen.setdefault(key, None)
    return list(seen)


def _text_cell(rec: dict[str, Any], column: str | None, where: str) -> str:
    value = rec.get(column) if column is not None else None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = " ".join(v.strip() for v in value if v.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        if value is None:
            raise DataError(f"{where}: text column {column!r} is empty")
        raise DataError(
            f"{where}: text column {column!r} holds a {type(value).__name__}; "
            "accepted: a string or a list of strings"
        )
    value = value.strip()
    if not value:
        raise DataError(f"{where}: text column {column!r} is empty")
    return value


def _is_integral(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


def _as_int(value: Any) -> int | None:
    """The integer a label value denotes (``3``, ``"3"``, ``" 3 "``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("+-").isdigit():
            return int(s)
    return None


def _map_labels(
    raw: list[Any], label_names: list[str] | None, path: Path, column: str
) -> tuple[list[str], list[int]]:
    keys = [str(v).strip() for v in raw]
    if label_names is None:
        distinct = set(keys)
        ints = {k: _as_int(k) for k in distinct}
        if all(v is not None for v in ints.values()):
            ordered = sorted(distinct, key=lambda k: ints[k])  # type: ignore[arg-type,return-value]
        else:
            ordered = sorted(distinct)
        index = {k: i for i, k in enumerate(ordered)}
        return ordered, [index[k] for k in keys]

    names = [str(n) for n in label_names]
    if not names:
        raise DataError("label_names is empty; give at least one class name")
    if len(set(names)) != len(names):
        raise DataError(f"label_names repeats a name: {names}")
    index = {n: i for i, n in enumerate(names)}
    names_numeric = any(_as_int(n) is not None for n in names)
    out: list[int] = []
    for row_no, (key, value) in enumerate(zip(keys, raw, strict=True), start=1):
        if key in index:
            out.append(index[key])
            continue
        as_int = None if names_numeric else _as_int(value)
        if as_int is not None and 0 <= as_int < len(names):
            out.append(as_int)
            continue
        raise DataError(
            f"data file {str(path)!r}, row {row_no}: label {key!r} in column {column!r} is not "
            f"one of label_names {names}"
            + ("" if names_numeric else f" (nor an index 0..{len(names) - 1})")
        )
    return names, out
