"""Real processes for the deployment tests: started in their own sessions, all stopped after.

Every process a test starts carries ``MARKER=<token>`` in its environment, so that a test can
check that none (nor any helper it spawned: Flower executors, enclaves) is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKER = "SHIELDTUNE_TEST_PROCESS"
REPO = Path(__file__).resolve().parents[1]


def process_env(base: Path, token: str, platform_key: Path) -> dict[str, str]:
    """The environment of a test's processes: marked, offline, one thread, a private HOME."""
    return {
        **os.environ,
        MARKER: token,
        "SHIELDTUNE_SIM_PLATFORM_KEY": str(platform_key),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HOME": str(base / "home"),  # nothing in the user's ~/.flwr or ~/.cache
    }


def free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    except OSError as err:
        pytest.skip(f"cannot bind a loopback port: {err}")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(pids: list[int]) -> set[int]:
    kids, out, todo = _children(), set(), list(pids)
    while todo:
        pid = todo.pop()
        for kid in kids.get(pid, []):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


def marked(token: str) -> set[int]:
    """Live processes (not zombies) whose environment carries this test's marker."""
    found = set()
    needle = f"{MARKER}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and needle in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


class Procs:
    """Processes started by the test, each in its own session; all stopped in ``stop_all``."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shieldtune.cli.app", *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.logs,
        )
        out.close()
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        tree = _descendants([p.pid for p in self.started])
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        time.sleep(1.0)
        for pid in tree:  # detached Flower helpers (own sessions), the enclave process
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def wait_for(predicate, timeout_s: float, what: str, procs: Procs) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in procs.logs.glob("*.log")}
    pytest.fail(f"timed out waiting for {what}; logs: {json.dumps(logs, indent=1)}")


def tls_handshake(port: int, cafile: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass


@dataclass
class Site:
    """One deployment on loopback: TLS files of a throwaway CA (and another CA), a learnable
    table, a simulated platform key, marked processes and a port whose next one is free too
    (split's SuperLink listens one above its relay)."""

    base: Path
    certs: Path
    other_ca: Path
    table: Path
    key_file: Path
    platform_key: str
    token: str
    procs: Procs
    port: int

    def left_behind(self) -> set[int]:
        """Wait (10 s at most) for the marked processes to end; those still alive."""
        end = time.monotonic() + 10
        while marked(self.token) and time.monotonic() < end:
            time.sleep(0.5)
        return marked(self.token)


def site(base: Path, rows: int = 96) -> Site:
    """Prepare a :class:`Site` in ``base``."""
    from _tiny import write_keyword_table

    from shieldtune.cli.certs import write_tls_files
    from shieldtune.tee.backends.simulated import SimulatedPlatform

    certs, other_ca = base / "certs", base / "other-ca"
    write_tls_files(certs, ["127.0.0.1", "localhost"])
    write_tls_files(other_ca, ["127.0.0.1"])
    table = write_keyword_table(base / "kw.csv", rows=rows)
    key_file = base / "platform" / "sim_platform_key"
    key = SimulatedPlatform(key_file).public_key_hex
    token = uuid.uuid4().hex
    port = free_port()
    while not port_free(port + 1):
        port = free_port()
    procs = Procs(process_env(base, token, key_file), base)
    return Site(base, certs, other_ca, table, key_file, key, token, procs, port)


def port_free(port: int) -> bool:
    """Whether nothing accepts connections on loopback ``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
