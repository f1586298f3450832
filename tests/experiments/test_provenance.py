"""Provenance: versions, machine, seeds and the data's attribution (from the data README)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch
from _experiment import experiment_data, write_experiment

from shieldtune.experiments import load_experiment
from shieldtune.experiments.provenance import package_versions, provenance, source_revision


def test_provenance_names_versions_machine_and_table(tmp_path, keyword_table):
    file = write_experiment(tmp_path / "e.yaml", experiment_data(keyword_table, tmp_path / "o"))
    prov = provenance(load_experiment(file), argv=["shieldtune", "experiment", str(file)])
    assert prov["python"] == platform.python_version() and prov["seeds"] == [0, 1]
    assert set(prov["packages"]) >= {"torch", "transformers", "peft", "flwr", "cryptography"}
    assert prov["packages"]["torch"] == package_versions(("torch",))["torch"]
    assert prov["cpu"] and prov["command"].startswith("shieldtune experiment")
    assert prov["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()  # AVX512, AVX2...
    (data,) = prov["data"]
    assert data["dataset"] == "kw" and str(keyword_table) in data["source"]


def test_medical_sets_carry_their_source_licence_and_readme_row(tmp_path, shared_data):
    data = experiment_data(tmp_path / "unused.csv", tmp_path / "o")
    data["datasets"] = ["medical_abstracts", "pubmedqa", "mqp"]
    data["base"]["data"]["data_dir"] = str(shared_data)
    prov = provenance(load_experiment(write_experiment(tmp_path / "e.yaml", data)))
    by_name = {d["dataset"]: d for d in prov["data"]}
    assert by_name["medical_abstracts"]["licence"] == "CC BY-SA 3.0"
    assert "Schopf" in by_name["medical_abstracts"]["source"]
    assert by_name["pubmedqa"]["licence"] == "MIT"
    for d in by_name.values():  # the data folder README's own line for the file
        assert d["readme_header"].startswith("| file |")
        assert len(d["readme_rows"]) == 1 and d["files"][0] in d["readme_rows"][0]


def test_provenance_records_the_source_commit(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:  # the suite runs from an exported tree, not a checkout
        assert source_revision() is None
        return
    assert source_revision().removesuffix("+dirty") == head
    # a folder that is not a git checkout has no revision
    assert source_revision(tmp_path) is None
