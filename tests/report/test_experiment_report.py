"""``shieldtune report``: the tables, curves, leakage and overhead sections, and provenance."""

from __future__ import annotations

import json
import platform
import shutil

from _experiment import run_cli

from shieldtune.errors import ExitCode
from shieldtune.experiments.provenance import package_versions
from shieldtune.report import write_report
from shieldtune.report.tables import fmt_stat


def _copy(tiny_experiment, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(tiny_experiment.folder, out)
    return out


def test_report_holds_the_table_curves_and_provenance(tiny_experiment, tmp_path):
    folder = _copy(tiny_experiment, tmp_path)
    result = run_cli("report", str(folder))
    assert result.exit_code == 0, result.output
    html = (folder / "report.html").read_text()
    md = (folder / "report.md").read_text()
    results = json.loads((folder / "results.json").read_text())
    for page in (html, md):
        for s in results["summary"]:  # the mean ± std table
            assert s["row"] in page and fmt_stat("accuracy", s["accuracy"]) in page
        for c in results["cells"]:
            assert c["run_dir"] in page
        assert platform.python_version() in page  # provenance
        for name, version in package_versions(
            ("torch", "transformers", "peft", "flwr", "cryptography")
        ).items():
            assert f"{name}" in page and str(version) in page
        assert "Seeds: 0, 1." in page and "name: tiny-kw" in page  # seeds and the config
        (ref,) = results["references"]  # the majority-class reference beside the table
        assert "Reference, the majority class" in page and f"{ref['accuracy']:.3f}" in page
        assert "No attack results in this folder" in page  # said plainly, nothing invented
        assert "From benchmarks: none" in page
    assert html.count('src="data:image/png;base64,') == 1  # the curves, embedded
    assert "![training curves, kw](report_files/curves_0.png)" in md
    assert (folder / "report_files" / "curves_0.png").stat().st_size > 1000
    assert "not scored alike" not in md

    # a comparison whose rows' macro-F1 is scored differently: no Δ, and the page says why
    (cmp,) = results["comparisons"]
    results["comparisons"] = [{**cmp, "macro_f1_delta_points": None}]
    (folder / "results.json").write_text(json.dumps(results))
    assert run_cli("report", str(folder)).exit_code == 0
    for page in ((folder / "report.html").read_text(), (folder / "report.md").read_text()):
        assert "macro-F1 is not scored alike" in page  # (HTML escapes the apostrophe)


def test_report_warns_when_cells_ran_on_different_cpu_kernels(tiny_experiment, tmp_path):
    folder = _copy(tiny_experiment, tmp_path)
    prov = json.loads((folder / "provenance.json").read_text())
    (first, *_) = prov["invocations"]
    kernels = first["cpu_kernels"]
    other = {**first, "cpu_kernels": "AVX2" if kernels != "AVX2" else "AVX512"}
    for extra, warned in (([], False), ([other], True)):
        (folder / "provenance.json").write_text(
            json.dumps({"invocations": [*prov["invocations"], *extra]})
        )
        assert run_cli("report", str(folder)).exit_code == 0
        md = (folder / "report.md").read_text()
        assert ("cells ran on different CPUs" in md) is warned
        assert f"torch kernels {other['cpu_kernels'] if warned else kernels}" in md  # the latest


def test_report_reads_attack_rows_and_benchmark_lines(tiny_experiment, tmp_path):
    folder = _copy(tiny_experiment, tmp_path)
    (folder / "attacks").mkdir()
    rows = [
        {
            "attack": "nn-inversion",
            "mode": mode,
            "cut": cut,
            "defence": "none",
            "metric": "token_recovery",
            "value": value,
            "chance": 0.03,
            "n": 10,
        }
        for cut in (0, 2)
        for mode, value in (("plain-split", 0.9 - 0.1 * cut), ("split", 0.0))
    ]
    rows += [
        {
            "attack": "mia-loss",
            "mode": "plain-fedavg",
            "cut": None,
            "defence": "none",
            "metric": "auc",
            "value": value,
            "chance": 0.5,
            "n": 64,
            "adapter": adapter,
        }
        for adapter, value in (("lora", 0.8), ("spf", 0.7))
    ]
    (folder / "attacks" / "leakage.json").write_text(json.dumps(rows))
    (folder / "benchmarks").mkdir()
    (folder / "benchmarks" / "split.txt").write_text(
        "# a table a person reads\n" + json.dumps({"plain_step_s": 2.0, "ratio": 1.75}) + "\n"
    )
    html = write_report(folder)[0].read_text()
    assert 'alt="token_recovery"' in html  # the leakage-vs-cut plot
    assert "0.700 (0.030)" in html  # value (chance)
    # two updates attacked alike are two lines, neither hidden behind the other
    assert "0.800 (0.500)" in html and "0.700 (0.500)" in html
    assert "split.txt" in html and "1.750" in html
    assert "No attack results" not in html and "From benchmarks: none" not in html


def test_report_of_a_folder_without_results_is_a_config_error(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.exit_code == ExitCode.CONFIG
    assert "not an experiment folder" in result.output
