"""The federation's throwaway CA and server certificate, checked with real TLS handshakes."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shieldtune.cli.certs import write_tls_files
from shieldtune.crypto.tls import make_tls_material
from shieldtune.errors import ConfigError


def _serve_once(cert, key) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the client refused us

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return port, thread


def _connect(port: int, cafile, name: str) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"x")


def test_certificate_chain_names_and_key_file(tmp_path):
    ca, cert, key = write_tls_files(tmp_path, ["127.0.0.1", "localhost", "fed.example.org"])
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    server = x509.load_pem_x509_certificate(cert.read_bytes())
    server.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fed.example.org"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in ca.read_bytes() + cert.read_bytes()  # the CA key is gone


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_real_handshake_verifies_with_the_ca_only(tmp_path, name):
    ca, cert, key = write_tls_files(tmp_path / "a", ["127.0.0.1", "localhost"])
    other_ca = write_tls_files(tmp_path / "b", ["127.0.0.1", "localhost"])[0]
    port, thread = _serve_once(cert, key)
    _connect(port, ca, name)
    thread.join(5)
    port, thread = _serve_once(cert, key)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _connect(port, other_ca, name)
    thread.join(5)
    port, thread = _serve_once(cert, key)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _connect(port, ca, "evil.example.org")  # a name the certificate does not carry
    thread.join(5)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="at least one host"):
        make_tls_material([])
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        make_tls_material(["bad..name"])
    with pytest.raises(ConfigError, match="days"):
        make_tls_material(["localhost"], days=0)
    write_tls_files(tmp_path, ["localhost"])
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="overwrite"):
        write_tls_files(tmp_path, ["localhost"])
    assert (tmp_path / "ca.pem").read_bytes() == before
    write_tls_files(tmp_path, ["localhost"], overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
