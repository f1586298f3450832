"""Built-in datasets: the real medical files (skipped without ../shared/data) and medical_sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from shieldtune.data import (
    BUILTIN_DATASETS,
    DATA_DIR_ENV,
    MEDICAL_CONDITIONS,
    builtin_info,
    generate_medical_sample,
    load_builtin,
    resolve_data_dir,
)
from shieldtune.errors import ConfigError, DataError


def test_registry_names() -> None:
    assert set(BUILTIN_DATASETS) == {"medical_abstracts", "pubmedqa", "mqp", "medical_sample"}
    assert builtin_info("pubmedqa").task == "pair"
    assert not builtin_info("medical_sample").needs_data_dir


def test_unknown_name_lists_accepted_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown built-in dataset 'imdb'.*medical_abstracts"):
        load_builtin("imdb")


def test_medical_abstracts(shared_data_dir: Path) -> None:
    ds = load_builtin("medical_abstracts", shared_data_dir)

    assert len(ds) == 2888
    assert ds.name == "medical_abstracts"
    assert ds.label_names == MEDICAL_CONDITIONS
    assert Counter(ds.labels()) == {4: 961, 0: 633, 3: 610, 2: 385, 1: 299}
    assert all(ex.text and ex.text_pair is None for ex in ds)


def test_pubmedqa(shared_data_dir: Path) -> None:
    ds = load_builtin("pubmedqa", shared_data_dir)

    assert len(ds) == 1000
    assert ds.label_names == ["yes", "no", "maybe"]
    assert Counter(ds.labels()) == {0: 552, 1: 338, 2: 110}
    first = ds[0]
    assert first.text.endswith("?")
    assert first.text_pair is not None and len(first.text_pair) > len(first.text)


def test_mqp(shared_data_dir: Path) -> None:
    ds = load_builtin("mqp", shared_data_dir)

    assert len(ds) == 3048
    assert ds.label_names == ["dissimilar", "similar"]
    assert Counter(ds.labels()) == {0: 1524, 1: 1524}
    assert ds.is_pair
    # the file has no header: its first data row must be kept
    assert ds[0].text.startswith("After how many hour")


def test_default_data_dir_is_used(shared_data_dir: Path) -> None:
    assert len(load_builtin("pubmedqa")) == 1000


def test_medical_sample_needs_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))

    ds = load_builtin("medical_sample")

    assert len(ds) == 400
    assert ds.label_names == MEDICAL_CONDITIONS
    assert Counter(ds.labels()) == {c: 80 for c in range(5)}
    assert len({ex.text for ex in ds}) == 400


def test_medical_sample_is_deterministic_and_seeded() -> None:
    a, b = generate_medical_sample(), generate_medical_sample()
    other = generate_medical_sample(seed=1)

    assert a.examples == b.examples
    assert a.examples != other.examples
    assert len(generate_medical_sample(n=23)) == 23


def test_medical_sample_has_signal_but_is_not_a_keyword_lookup() -> None:
    # a nearest-centroid bag-of-words model (train 300 / test 100) should do well but not
    # perfectly: the texts share templates and mention comorbidities of other classes
    ds = generate_medical_sample()
    train, test = ds.examples[:300], ds.examples[300:]
    counts: dict[int, Counter[str]] = {c: Counter() for c in range(5)}
    for ex in train:
        counts[ex.label].update(set(ex.text.lower().split()))
    totals = {c: sum(1 for ex in train if ex.label == c) for c in counts}

    def predict(text: str) -> int:
        words = set(text.lower().split())
        return max(counts, key=lambda c: sum(counts[c][w] / totals[c] for w in words))

    acc = sum(predict(ex.text) == ex.label for ex in test) / len(test)
    assert 0.5 < acc < 1.0


def test_missing_folder_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    absent = tmp_path / "no-such-dir"
    monkeypatch.setenv(DATA_DIR_ENV, str(absent))

    with pytest.raises(DataError) as err:
        load_builtin("mqp")

    msg = str(err.value)
    assert str(absent) in msg and DATA_DIR_ENV in msg


def test_explicit_folder_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'pubmedqa_pqal\.json' not found in data folder"):
        load_builtin("pubmedqa", tmp_path)
    with pytest.raises(DataError, match=r"does not exist"):
        resolve_data_dir(tmp_path / "missing")


def test_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "mqp.csv").write_text("1,q a,q b,1\n1,q c,q d,0\n", encoding="utf-8")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))

    ds = load_builtin("mqp")

    assert resolve_data_dir() == tmp_path
    assert len(ds) == 2 and ds.labels() == [1, 0]
