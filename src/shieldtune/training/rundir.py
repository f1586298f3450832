"""The run folder: written under a temporary name and renamed only when the run completes.

A crashed or interrupted run therefore never leaves a folder that looks complete: the final
folder (with ``summary.json``) appears atomically, and the partial one is named ``.partial-*``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RunDir"]


class RunDir:
    """A run folder being written.

    Args:
        parent: Folder holding run folders.
        name: The run's folder name.
        resume: Continue the existing ``.partial-<name>`` folder (a resumed run): keep its
            files, append to its ``metrics.jsonl``, continue its elapsed time.

    Raises:
        FileExistsError: A completed run of that name exists already.
        FileNotFoundError: ``resume`` and there is no partial folder to continue.
    """

    def __init__(self, parent: Path, name: str, *, resume: bool = False) -> None:
        self.final = parent / name
        if self.final.exists():
            raise FileExistsError(f"run folder {self.final} exists already; pick another run_name")
        self.path = parent / f".partial-{name}"
        self.started = time.time()
        if resume:
            if not self.path.is_dir():
                raise FileNotFoundError(f"no partial run folder {self.path} to resume")
            self.started -= _last_time(self.path / "metrics.jsonl")
        else:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        self._metrics = (self.path / "metrics.jsonl").open("a")
        self._lock = threading.Lock()  # clients of a simulated federation log from threads

    def log(self, **record: Any) -> None:
        """Append one metrics record (a JSON line) with the elapsed time."""
        record = {"time_s": round(time.time() - self.started, 3), **record}
        with self._lock:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file inside the run folder."""
        out = self.path / name
        out.write_text(text)
        return out

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` and move the folder to its final name (atomic rename)."""
        self._metrics.close()
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2))
        os.replace(self.path, self.final)
        return self.final

    def abort(self) -> None:
        """Close files; the partial folder stays under its ``.partial-`` name for inspection."""
        if not self._metrics.closed:
            self._metrics.close()


def _last_time(metrics: Path) -> float:
    """The ``time_s`` of the last metrics line (0 when there is none)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0.0
    for line in reversed(lines):
        try:
            return float(json.loads(line)["time_s"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0.0
