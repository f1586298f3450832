"""load_table: column mapping, label mapping and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldtune.data import Dataset, Example, load_table
from shieldtune.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "notes.csv",
        "id,body,diagnosis\n"
        '1,"chest pain, radiating",cardio\n'
        "2,headache and aura,neuro\n"
        "3,palpitations,cardio\n",
    )


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    rows = [
        {"q1": "Is aspirin safe?", "q2": "Can I take aspirin?", "y": 1},
        {"q1": "What is a migraine?", "q2": "How tall is Everest?", "y": 0},
        {"q1": "Flu symptoms?", "q2": "Signs of influenza?", "y": 1},
    ]
    return _write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")


def test_load_csv_maps_columns_and_sorted_string_labels(csv_file: Path) -> None:
    # Prepare / Execute
    ds = load_table(csv_file, text="body", label="diagnosis")

    # Assert
    assert isinstance(ds, Dataset)
    assert len(ds) == 3
    assert ds.name == "notes"
    assert ds.label_names == ["cardio", "neuro"]
    assert ds.num_labels == 2
    assert ds.labels() == [0, 1, 0]
    assert ds[0] == Example(text="chest pain, radiating", label=0, text_pair=None)
    assert not ds.is_pair


def test_load_jsonl_pair_with_int_labels(jsonl_file: Path) -> None:
    ds = load_table(jsonl_file, text="q1", text_pair="q2", label="y", name="qp")

    assert ds.name == "qp"
    assert ds.label_names == ["0", "1"]
    assert ds.labels() == [1, 0, 1]
    assert ds[1].text_pair == "How tall is Everest?"
    assert ds.is_pair


def test_int_labels_sort_numerically(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", "t,l\na,10\nb,2\nc,1\n")

    ds = load_table(path, text="t", label="l")

    assert ds.label_names == ["1", "2", "10"]
    assert ds.labels() == [2, 1, 0]


def test_label_names_fix_the_order_and_accept_indices(jsonl_file: Path, csv_file: Path) -> None:
    by_index = load_table(
        jsonl_file, text="q1", text_pair="q2", label="y", label_names=["dissimilar", "similar"]
    )
    by_name = load_table(csv_file, text="body", label="diagnosis", label_names=["neuro", "cardio"])

    assert by_index.label_names == ["dissimilar", "similar"]
    assert by_index.labels() == [1, 0, 1]
    assert by_name.labels() == [1, 0, 1]


def test_label_not_in_label_names_is_named(csv_file: Path) -> None:
    with pytest.raises(DataError) as err:
        load_table(csv_file, text="body", label="diagnosis", label_names=["cardio", "onco"])

    msg = str(err.value)
    assert "'neuro'" in msg and "row 2" in msg and "['cardio', 'onco']" in msg


def test_json_object_of_records_and_list_cells(tmp_path: Path) -> None:
    data = {
        "7": {"Q": "Does it help?", "C": ["Part one.", "Part two."], "d": "yes"},
        "9": {"Q": "Is it harmful?", "C": ["Only part."], "d": "no"},
    }
    path = _write(tmp_path / "qa.json", json.dumps(data))

    ds = load_table(path, text="Q", text_pair="C", label="d", label_names=["yes", "no", "maybe"])

    assert len(ds) == 2
    assert ds[0].text_pair == "Part one. Part two."
    assert ds.labels() == [0, 1]
    assert ds.num_labels == 3


def test_headerless_csv_with_fieldnames(tmp_path: Path) -> None:
    path = _write(tmp_path / "mqp_like.csv", "1,q a,q b,1\n1,q c,q d,0\n")

    ds = load_table(path, text="a", text_pair="b", label="y", fieldnames=["id", "a", "b", "y"])

    assert [(e.text, e.text_pair, e.label) for e in ds] == [("q a", "q b", 1), ("q c", "q d", 0)]


def test_unknown_column_lists_available_columns(csv_file: Path) -> None:
    with pytest.raises(DataError) as err:
        load_table(csv_file, text="text", label="diagnosis")

    msg = str(err.value)
    assert "no column 'text'" in msg
    assert "'id', 'body', 'diagnosis'" in msg
    assert "notes.csv" in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"

    with pytest.raises(DataError, match=r"nope\.csv.*does not exist"):
        load_table(missing, text="t", label="l")


@pytest.mark.parametrize(
    "name,content",
    [("empty.csv", ""), ("header.csv", "t,l\n"), ("empty.jsonl", "\n\n"), ("empty.json", "[]")],
)
def test_empty_file_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    path = _write(tmp_path / name, content)

    with pytest.raises(DataError, match=r"is empty"):
        load_table(path, text="t", label="l")


def test_empty_text_cell_names_the_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "holes.csv", "t,l\nfine,a\n  ,b\n")

    with pytest.raises(DataError) as err:
        load_table(path, text="t", label="l")

    msg = str(err.value)
    assert "row 2" in msg and "line 3" in msg and "text column 't' is empty" in msg


def test_empty_label_cell_names_the_row(jsonl_file: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "nolabel.jsonl", '{"t": "x", "l": "a"}\n{"t": "y", "l": ""}\n')

    with pytest.raises(DataError, match=r"row 2.*label column 'l' is empty"):
        load_table(path, text="t", label="l")


def test_bad_json_and_unknown_suffix(tmp_path: Path) -> None:
    broken = _write(tmp_path / "b.jsonl", '{"t": "x", "l": 1}\n{oops\n')
    odd = _write(tmp_path / "table.xlsx", "t,l\nx,1\n")

    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_table(broken, text="t", label="l")
    with pytest.raises(DataError, match=r"suffix '\.xlsx'"):
        load_table(odd, text="t", label="l")
    assert len(load_table(odd, text="t", label="l", format="csv")) == 1


def test_dataset_rejects_out_of_range_labels() -> None:
    with pytest.raises(DataError, match=r"label 2, outside 0\.\.1"):
        Dataset(examples=[Example("x", 2)], label_names=["a", "b"], name="bad")
