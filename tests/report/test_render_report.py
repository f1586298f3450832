"""benchmarks/render_report.py: the report rendered by headless Chromium (skips without it)."""

from __future__ import annotations

import importlib.util
import shutil
import struct
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "render_report.py"


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_chromium_names_the_install_command(render, tmp_path, monkeypatch):
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        render.render(tmp_path, tmp_path / "out.png")


def test_report_renders_in_headless_chromium(render, tiny_experiment, tmp_path, monkeypatch):
    monkeypatch.delenv("CHROMIUM", raising=False)
    if render.find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    folder = tmp_path / "exp"
    shutil.copytree(tiny_experiment.folder, folder)
    out = render.render(folder, tmp_path / "report.png", 1280, 1600)
    assert (folder / "report.html").is_file()  # written first, as the report command does
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1280, 1600)
    assert out.stat().st_size > 20_000  # a page with tables and a figure, not a blank one
