"""``shieldtune serve CONFIG``: the server of a multi-machine federation on Flower.

(``mode: split`` is served by :mod:`shieldtune.cli.split_deploy`: the split-server enclave and
its gRPC relay.)

What it does, in order:

1. validates the config (``mode: plain-fedavg`` or ``secure-fedavg``) and the TLS files;
2. starts a Flower SuperLink (``flower-superlink``: Fleet, Control and Runtime APIs on one HTTPS
   port, ``--host`` / ``--port``), unless ``--superlink HOST:PORT`` names a running one;
3. writes a Flower app folder (``pyproject.toml`` naming shieldtune's ``ServerApp`` and
   ``ClientApp``) and submits it with ``flwr run APP shieldtune --run-config ... --stream``;
   the SuperLink runs the ServerApp (:func:`shieldtune.recipes.federated.serve_federation`) in a
   ``flwr-serverapp`` process: it waits for the clients (``shieldtune join``), runs the rounds
   and writes the run folder;
4. shows each round as it completes, then the summary; stops the SuperLink.

Flower's own logs go to ``superlink.log`` and ``flwr-run.log`` in a private state folder (kept,
and named, when something fails).

Exposure: Flower 1.42's SuperLink serves its Control API (submit / stop runs) on the same port as
the Fleet API and does not authenticate it (OIDC is an enterprise plugin), and it accepts any
SuperNode unless SuperNode authentication is set up. ``--host`` defaults to loopback; on
``0.0.0.0`` let only the federation's hosts reach the port.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.panel import Panel

from shieldtune.cli._common import console
from shieldtune.cli._flower import (
    Child,
    check_port_free,
    flower_env,
    flower_exe,
    parse_address,
    sigterm_as_interrupt,
    tls_files,
)
from shieldtune.config import RunConfig, load_config, to_yaml
from shieldtune.errors import ConfigError, ShieldtuneError

__all__ = ["EPILOG", "serve_command"]

EPILOG = """Examples (server host; clients then run `shieldtune join`):

  shieldtune certs certs --host fed.example.org

  shieldtune serve configs/federated/secure_fedavg_tiny.yaml --certs certs --host 0.0.0.0

  shieldtune serve configs/split/spf_lora_tiny.yaml --certs certs --host 0.0.0.0 --port 9093

mode: split serves the split-server enclave and its gRPC relay on --host/--port (TLS from
--certs; the records are sealed end to end either way, TLS also hides the metadata) until its
client has finished (or Ctrl-C), then writes the server's run folder (sealed state, audit log,
summary). With split.clients > 1 the rounds run on Flower: the SuperLink listens on --port + 1
and the ServerApp owns the split-server and fedavg-sparse enclaves.
"""
CONNECTION = "shieldtune"  # the SuperLink connection's name in the private FLWR_HOME


def _resolve(cfg: RunConfig, resume: Path | None) -> RunConfig:
    """Absolute output folder and a fixed run name (the ServerApp runs in another process)."""
    if cfg.mode not in ("plain-fedavg", "secure-fedavg", "split"):
        raise ConfigError(
            f"mode: shieldtune serve runs split, plain-fedavg or secure-fedavg, not {cfg.mode!r}"
        )
    data = cfg.model_dump(mode="json")
    if resume is not None:
        folder = Path(resume).resolve()
        name = folder.name.removeprefix(".partial-")
        data["output_dir"], data["run_name"] = str(folder.parent), name
    else:
        out = Path(cfg.output_dir).resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = cfg.run_name or f"{cfg.mode}-{Path(cfg.model.name).name}-{stamp}"
        if (out / name).exists():
            raise ConfigError(f"run folder {out / name} exists already; pick another run_name")
        data["output_dir"], data["run_name"] = str(out), name
    return RunConfig.model_validate(data)


def _announce_secure(cfg: RunConfig) -> None:
    from shieldtune.federated.deploy import ENCLAVE_PROGRAM, enclave_config
    from shieldtune.tee.program import measure_program

    measurement = measure_program(ENCLAVE_PROGRAM, enclave_config(cfg))
    console.print(f"server enclave: program {ENCLAVE_PROGRAM}, measurement {measurement}")
    if cfg.federated.backend == "simulated":
        from shieldtune.tee.backends.simulated import SimulatedPlatform

        key = SimulatedPlatform().public_key_hex
        console.print(
            Panel(
                "secure-fedavg on a SIMULATED enclave: an ordinary process, NO hardware "
                "protection (development and testing only).\n"
                f"simulated platform key: {key}\n"
                f"clients pin it with: shieldtune join ... --trust-platform-key {key}",
                title="SIMULATED ENCLAVE",
                style="bold yellow",
            )
        )


def _follow(metrics: Path, offset: int) -> int:
    """Print the round lines appended to ``metrics`` since ``offset``; return the new offset."""
    try:
        with metrics.open() as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset
    end = chunk.rfind("\n") + 1
    for line in chunk[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        kind = rec.get("kind")
        if kind == "eval":
            acc = rec.get("accuracy")
            acc_text = f"accuracy {acc:.4f} · " if isinstance(acc, float) else ""
            console.print(
                f"round {rec['step']}: {acc_text}loss {rec.get('loss', float('nan')):.4f} "
                f"({rec.get('clients', '?')} clients)"
            )
        elif kind in ("dropped", "refused", "refused_client", "round_failed", "resumed"):
            console.print(f"[yellow]{kind}[/]: {rec}", highlight=False)
    return offset + end


def _raise_status(status_file: Path, run_log: Path) -> Path:
    """The run folder the ServerApp reported, or its error raised as the same class."""
    import shieldtune.errors as errors

    if not status_file.is_file():
        tail = "\n".join(run_log.read_text(errors="replace").splitlines()[-12:])
        raise ShieldtuneError(f"the federation run did not complete; flwr run's log:\n{tail}")
    status = json.loads(status_file.read_text())
    if status.get("ok"):
        return Path(status["run_dir"])
    cls = getattr(errors, str(status.get("error")), None)
    message = str(status.get("message", "the ServerApp failed"))
    if isinstance(cls, type) and issubclass(cls, ShieldtuneError):
        raise cls(message)
    raise ShieldtuneError(f"the ServerApp failed: {status.get('error')}: {message}")


def serve_command(
    config: Path | None,
    overrides: list[str],
    *,
    host: str,
    port: int,
    certs: Path | None,
    insecure: bool,
    superlink: str | None,
    resume: Path | None,
) -> int:
    """Validate, start the SuperLink, submit the run, follow it, stop everything.

    Returns:
        Exit code 0 (errors are raised as :class:`ShieldtuneError`).
    """
    from shieldtune.cli.flower_app import APP_CONFIG, CLIENT_APP_REF, SERVER_APP_REF, encode_config
    from shieldtune.cli.train import print_summary
    from shieldtune.federated.deploy import (
        check_secure_opt_in,
        federation_fingerprint,
        write_app_bundle,
    )

    cfg = load_config(config, overrides)
    split = cfg.mode == "split"
    if split:
        from shieldtune.cli.split_deploy import check_split_serve, serve_split_command

        check_split_serve(cfg, port, superlink, resume)
        if cfg.split.clients == 1:  # no Flower: the relay alone
            return serve_split_command(cfg, host, port, certs, insecure)
    cfg = _resolve(cfg, resume)
    check_secure_opt_in(cfg)
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is outside 1..65535")
    if insecure and certs is not None:
        raise ConfigError("--insecure and --certs exclude each other")
    if superlink is not None:
        link_host, link_port = parse_address(superlink, "--superlink")
    else:
        link_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        link_port = port + 1 if split else port  # split: its relay has --port
    ca = server_cert = server_key = None
    if not insecure:
        names = ["ca.pem"] if superlink is not None else ["ca.pem", "server.pem", "server.key"]
        found = tls_files(certs, names)
        ca = found[0]
        if superlink is None:
            server_cert, server_key = found[1], found[2]
    if resume is not None and not Path(resume).exists():
        raise ConfigError(f"--resume: no run folder {resume}")
    if cfg.mode == "secure-fedavg":
        _announce_secure(cfg)
    elif split:
        from shieldtune.cli.split_deploy import announce_split_rounds

        announce_split_rounds(cfg)

    state = Path(tempfile.mkdtemp(prefix="shieldtune-serve-"))
    home = state / "flwr-home"
    home.mkdir()
    env = flower_env(home)
    connection = [f"[superlink.{CONNECTION}]", f'address = "{link_host}:{link_port}"']
    connection += [f"root-certificates = {json.dumps(str(ca))}"] if ca else ["insecure = true"]
    (home / "config.toml").write_text(
        "\n".join(["[superlink]", f'default = "{CONNECTION}"', "", *connection, ""])
    )
    app = write_app_bundle(
        state / "app", server_app=SERVER_APP_REF, client_app=CLIENT_APP_REF, config=APP_CONFIG
    )
    status_file = state / "status.json"
    run_config = {
        "shieldtune-config": encode_config(to_yaml(cfg)),
        "resume": str(Path(resume).resolve()) if resume is not None else "",
        "fingerprint": federation_fingerprint(cfg),
        "poll-s": 0.5,
        "status-file": str(status_file),
    }
    if split:  # the ServerApp runs the split relay (it reads the TLS files on this host)
        cert, key = (str(server_cert), str(server_key)) if server_cert else ("", "")
        run_config.update({"split-host": host, "split-port": port})
        run_config.update({"split-cert": cert, "split-key": key})
    (state / "run-config.toml").write_text(
        "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in run_config.items())
    )
    link: Child | None = None
    run: Child | None = None
    ok = False
    try:
        with sigterm_as_interrupt():
            if split:
                check_port_free(host, port)  # the ServerApp's relay listens there
            if superlink is None:
                check_port_free(host, link_port)
                argv = [flower_exe("flower-superlink"), "--host", host, "--port", str(link_port)]
                if insecure:
                    argv.append("--insecure")
                else:
                    argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(server_cert)]
                    argv += ["--ssl-keyfile", str(server_key)]
                argv.append("--disable-runtime-dependency-installation")
                link = Child("flower-superlink", argv, env, state / "superlink.log")
                link.wait_listening(link_host, link_port)
                tls = "TLS" if not insecure else "NO TLS (--insecure)"
                console.print(f"SuperLink listening on {host}:{link_port} ({tls})")
                if host not in ("127.0.0.1", "::1", "localhost"):
                    console.print(
                        "[yellow]note[/]: this port also serves Flower's Control API, which "
                        "Flower 1.42 does not authenticate, and accepts any SuperNode: let "
                        "only the federation's hosts reach it (firewall)"
                    )
            argv = [flower_exe("flwr"), "run", str(app), CONNECTION, "--run-config"]
            argv += [str(state / "run-config.toml"), "--stream"]
            run = Child("flwr run", argv, env, state / "flwr-run.log")
            clients = cfg.split.clients if split else cfg.federated.num_clients
            console.print(
                f"{cfg.mode}: waiting for {clients} client(s) "
                f"(at least {cfg.federated.min_clients}), {cfg.federated.rounds} round(s)"
            )
            out = Path(cfg.output_dir)
            metrics = out / f".partial-{cfg.run_name}" / "metrics.jsonl"
            offset = 0
            if resume is not None:  # show only the new rounds (the folder may be final still)
                for old in (metrics, out / str(cfg.run_name) / "metrics.jsonl"):
                    offset = old.stat().st_size if old.is_file() else offset
            while run.alive():
                offset = _follow(metrics, offset)
                if link is not None and not link.alive():
                    raise ShieldtuneError(f"the SuperLink exited:\n{link.tail()}")
                time.sleep(0.5)
            _follow(metrics, offset)
            run_dir = _raise_status(status_file, state / "flwr-run.log")
        ok = True
    finally:
        if run is not None:
            run.stop()
        if link is not None:
            link.stop()
        if ok or (link is None and run is None):  # nothing of Flower's to look at
            shutil.rmtree(state, ignore_errors=True)
        else:
            console.print(f"Flower logs kept in {state}")
    if split:
        from shieldtune.cli.split_deploy import server_report

        return server_report(run_dir)
    print_summary(cfg, run_dir)
    return 0
