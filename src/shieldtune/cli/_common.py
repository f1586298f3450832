"""CLI plumbing: one clear line per error and a documented exit code, progress display."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shieldtune.errors import ConfigError, ExitCode, ShieldtuneError, exit_code_for

__all__ = ["console", "err_console", "guarded", "quiet_libraries", "progress_bar"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def quiet_libraries() -> None:
    """Silence third-party chatter (load reports, deprecation warnings); keep our own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def guarded(fn: Callable[[], int | None]) -> int:
    """Run a command body; map errors to one line on stderr and a documented exit code."""
    try:
        return int(fn() or 0)
    except ShieldtuneError as err:
        code = exit_code_for(err)
        lines = err.problems if isinstance(err, ConfigError) else [str(err)]
        for line in lines:
            err_console.print(f"[bold red]error[/]: {line}", highlight=False)
        return int(code)
    except FileExistsError as err:
        err_console.print(f"[bold red]error[/]: {err}", highlight=False)
        return int(ExitCode.CONFIG)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: the run folder was left as .partial-*")
        return 130
    except Exception as err:  # noqa: BLE001  (last resort: one line, not a torch traceback)
        if os.environ.get("SHIELDTUNE_DEBUG"):
            raise
        err_console.print(
            f"[bold red]unexpected error[/]: {type(err).__name__}: {err} "
            "(set SHIELDTUNE_DEBUG=1 for the traceback)",
            highlight=False,
        )
        return int(ExitCode.UNEXPECTED)


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar fed by the training loop's ``on_progress`` records."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.1f} samples/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not sys.stdout.isatty(),
    )
    task = progress.add_task(label, total=None, loss=float("nan"), rate=0.0)

    def update(info: dict[str, Any]) -> None:
        progress.update(
            task,
            completed=info["step"],
            total=info["total"],
            loss=info["loss"],
            rate=info["samples_per_s"],
        )

    with progress:
        yield update
