"""The CLI in-process: one clear error line + documented exit code; a real run writes its folder."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from shieldtune.cli.app import app
from shieldtune.errors import ExitCode

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["train", "/no/such.yaml"], ExitCode.CONFIG, "does not exist"),
        (
            ["train", "--set", "model.name=nope", "--set", "data.dataset=medical_sample"],
            ExitCode.MODEL,
            "unknown model 'nope'",
        ),
        (["train", "--set", "train.epochs=0"], ExitCode.CONFIG, "train.epochs"),
        (
            [
                "train",
                "--set",
                "mode=plain-split",
                "--set",
                "split.front_adapter={method: spf, density: 0}",
            ],
            ExitCode.CONFIG,
            "density",
        ),
        (
            [
                "train",
                "--set",
                "data.dataset=table",
                "--set",
                "data.path=/no/file.csv",
                "--set",
                "data.text=t",
                "--set",
                "data.label=l",
            ],
            ExitCode.DATA,
            "/no/file.csv",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(args, code, message):
    result = runner.invoke(app, args)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_wrong_column_and_cut_out_of_range(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "\n".join(f"row {i},{i % 2}" for i in range(20)))
    base = [
        "train",
        "--set",
        "data.dataset=table",
        "--set",
        f"data.path={table}",
        "--set",
        "data.label=label",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "model.name=tiny-gpt2",
    ]
    result = runner.invoke(app, [*base, "--set", "data.text=body"])
    assert result.exit_code == ExitCode.DATA and "body" in result.output
    result = runner.invoke(
        app, [*base, "--set", "data.text=text", "--set", "mode=plain-split", "--set", "split.cut=9"]
    )
    assert result.exit_code == ExitCode.MODEL and "cut layer 9" in result.output
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no run folder left behind


def test_train_writes_a_run_folder(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--set",
            "data.dataset=medical_sample",
            "--set",
            "model.name=tiny-bert",
            "--set",
            "train.max_steps=2",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "run_name=cli",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "run folder" in result.output
    assert {p.name for p in (tmp_path / "cli").iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "adapter",
    }
