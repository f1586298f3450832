"""What ``shieldtune serve`` and ``shieldtune join`` share: Flower executables, child processes.

Flower's SuperLink and SuperNode start helper processes by name (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``), so the folder of this interpreter's console scripts
goes first on their ``PATH``. Each gets its own ``FLWR_HOME`` (a private folder of the command),
so nothing is read from or written to the user's ``~/.flwr``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from shieldtune.errors import ConfigError

__all__ = [
    "flower_exe",
    "flower_env",
    "parse_address",
    "free_port",
    "check_port_free",
    "tls_files",
    "Child",
    "sigterm_as_interrupt",
]

#: SuperExec's task poll interval (Flower's default is 1 s); a shorter one shortens each round.
_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def flower_exe(name: str) -> str:
    """Path of a Flower console script (next to this interpreter, else on ``PATH``).

    Raises:
        ConfigError: Not installed.
    """
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"Flower's {name} is not installed (pip install flwr==1.42.0)")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a Flower process: private ``FLWR_HOME``, our scripts first on PATH."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault(_POLL_ENV, "0.2")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no calls home from a federation's hosts
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parse_address(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``.

    Raises:
        ConfigError: Not of that form, or the port is outside 1..65535.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT (e.g. 10.0.0.5:9092)")
    return host, int(port)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process holds (our readiness check could mistake it for ours).

    Raises:
        ConfigError: ``host:port`` cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tls_files(folder: Path | None, names: Sequence[str]) -> list[Path]:
    """The given files of a ``shieldtune certs`` folder, each checked to exist.

    Raises:
        ConfigError: No folder, or a file missing.
    """
    if folder is None:
        raise ConfigError(
            "TLS: give --certs DIR (make one with `shieldtune certs DIR --host NAME`) or, on a "
            "trusted test network only, --insecure"
        )
    paths = [Path(folder) / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"TLS: {', '.join(missing)} not found (make them with shieldtune certs)")
    return [p.resolve() for p in paths]


class Child:
    """A Flower process started and stopped by this command (its output in a log file).

    Args:
        name: What it is (for messages).
        argv: The command line.
        env: Its environment.
        log: File receiving its stdout and stderr (None: inherit ours).
    """

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path | None = None
    ) -> None:
        self.name, self.log = name, log
        out = log.open("ab") if log is not None else None
        try:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None
            )
        finally:
            if out is not None:
                out.close()

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        """The last lines of its log (empty without a log file)."""
        if self.log is None or not self.log.is_file():
            return ""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; return its exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def wait_listening(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        """Wait until ``host:port`` accepts TCP connections.

        Raises:
            ConfigError: The process exited, or the port did not open in time.
        """
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if not self.alive():
                raise ConfigError(
                    f"{self.name} exited with code {self.proc.returncode} before listening on "
                    f"{host}:{port} (port in use? bad certificate?); its log:\n{self.tail()}"
                )
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise ConfigError(f"{self.name} did not listen on {host}:{port} within {timeout_s:.0f} s")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that ``finally`` blocks stop our children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
