"""``shieldtune certs DIR --host NAME``: a throwaway CA and the SuperLink's TLS certificate.

Writes ``DIR/ca.pem`` (copy it to every client host), ``DIR/server.pem`` and ``DIR/server.key``
(mode 0600; they stay on the server host). The CA key is not kept (see
:mod:`shieldtune.crypto.tls`).
"""

from __future__ import annotations

import os
from pathlib import Path

from shieldtune.cli._common import console
from shieldtune.crypto.tls import make_tls_material
from shieldtune.errors import ConfigError

__all__ = ["EPILOG", "certs_command", "write_tls_files"]

EPILOG = """Example (one server reachable as fed.example.org and 10.0.0.5):

  shieldtune certs certs --host fed.example.org --host 10.0.0.5

then copy certs/ca.pem to each client host.
"""
FILES = ("ca.pem", "server.pem", "server.key")


def write_tls_files(
    out_dir: Path, hosts: list[str], days: int = 30, overwrite: bool = False
) -> list[Path]:
    """Make the TLS material and write ``ca.pem``, ``server.pem``, ``server.key`` (0600).

    Raises:
        ConfigError: Bad host or days, or the files exist and not ``overwrite``.
    """
    material = make_tls_material(hosts, days=days)
    out_dir = Path(out_dir)
    paths = [out_dir / n for n in FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} exist already; pass --overwrite to replace")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = paths
    ca.write_bytes(material.ca_cert)
    cert.write_bytes(material.server_cert)
    key.unlink(missing_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(material.server_key)
    return paths


def certs_command(out_dir: Path, hosts: list[str], days: int, overwrite: bool) -> int:
    """Write the files and say which goes where."""
    ca, cert, key = write_tls_files(out_dir, hosts, days, overwrite)
    console.print(f"CA certificate      {ca}  (copy to every client host)")
    console.print(f"server certificate  {cert}  (server host; valid for {', '.join(hosts)})")
    console.print(f"server private key  {key}  (server host only, mode 0600)")
    console.print(f"valid {days} day(s); the CA's private key was not kept")
    return 0
