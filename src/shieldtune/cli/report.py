"""``shieldtune report RUN_DIR``: an experiment folder as report.html and report.md."""

from __future__ import annotations

from pathlib import Path

from shieldtune.cli._common import console

__all__ = ["report_command", "EPILOG"]

EPILOG = """Examples:

  shieldtune report runs/experiments/paper_minilm

  .venv/bin/python benchmarks/render_report.py runs/experiments/paper_minilm report.png
"""


def report_command(run_dir: Path) -> int:
    """Write report.html (self-contained) and report.md into an experiment folder.

    Returns:
        Exit code 0.
    """
    from shieldtune.report import write_report

    html_file, md_file = write_report(run_dir)
    console.print(f"report: [bold]{html_file}[/] and [bold]{md_file}[/]", highlight=False)
    return 0
