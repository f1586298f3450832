"""Render an experiment folder's report.html in headless Chromium and save a screenshot.

    .venv/bin/python benchmarks/render_report.py RUN_DIR OUT.png [--width 1280 --height 2400]

Writes RUN_DIR/report.html first when it is missing (``shieldtune report RUN_DIR``). Needs
Chromium (``/usr/bin/chromium``, or ``$CHROMIUM``); on Debian/Ubuntu: ``apt-get install -y
chromium`` (``make report-deps``). Chromium runs with a fresh, throw-away profile, no network
services and no sandbox (it is rendering a local file this project wrote). Exit codes: 0 the
screenshot was written, 2 Chromium is missing, 1 it failed to render.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTALL = "apt-get install -y chromium"


def find_chromium() -> str | None:
    """``$CHROMIUM``, else /usr/bin/chromium, else chromium / chromium-browser on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_command(
    chromium: str, page: Path, out: Path, profile: Path, width: int, height: int
) -> list[str]:
    """The headless screenshot command line."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={width},{height}",
        page.resolve().as_uri(),
    ]


def render(run_dir: Path, out: Path, width: int = 1280, height: int = 2400) -> Path:
    """Screenshot ``run_dir/report.html`` into ``out``.

    Raises:
        FileNotFoundError: Chromium is not installed (the message names the install command).
        RuntimeError: Chromium failed or wrote no screenshot.
    """
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(
            f"Chromium not found (looked at $CHROMIUM, /usr/bin/chromium, PATH); install it "
            f"with `{INSTALL}` (or `make report-deps`)"
        )
    page = run_dir / "report.html"
    if not page.is_file():
        from shieldtune.report import write_report

        write_report(run_dir)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        cmd = chromium_command(chromium, page, out, Path(profile), width, height)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"Chromium did not finish in {err.timeout:.0f} s") from None
    if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        tail = (done.stderr or done.stdout)[-1500:]
        raise RuntimeError(f"Chromium exited {done.returncode} without a screenshot:\n{tail}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="experiment folder (holds results.json)")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    try:
        out = render(args.run_dir, args.out, args.width, args.height)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"screenshot: {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
