"""Throwaway TLS material for a federation: a private CA and one server certificate.

Flower's SuperLink serves its Fleet, Control and Runtime APIs over one HTTPS port
(``--ssl-certfile`` / ``--ssl-keyfile`` / ``--ssl-ca-certfile``); SuperNodes and ``flwr run``
verify it with the CA certificate (``--root-certificates``). :func:`make_tls_material` returns,
as PEM bytes (no I/O here; ``shieldtune certs`` writes them as ``ca.pem``, ``server.pem``,
``server.key``):

- the CA certificate (every client host gets a copy);
- the SuperLink's certificate (subject alternative names: every given host name and IP
  address) and its private key (stays on the server host).

The CA's private key is never returned: it signs the one server certificate and is dropped, so
nobody (including whoever holds these files) can issue a second certificate that clients trust.
Make a new set to add a host name. Keys are ECDSA P-256, signatures SHA-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shieldtune.errors import ConfigError

__all__ = ["TlsMaterial", "make_tls_material", "san_entries"]


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of the CA certificate, the server certificate and the server's private key."""

    ca_cert: bytes
    server_cert: bytes
    server_key: bytes


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as ``IPAddress``, anything else as ``DNSName``.

    Raises:
        ConfigError: No host, or an empty / malformed name.
    """
    if not hosts:
        raise ConfigError("TLS: give at least one host name or IP address for the certificate")
    out: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if not host or any(not lab or len(lab) > 63 for lab in labels) or ":" in host:
            raise ConfigError(f"TLS: {host!r} is neither an IP address nor a DNS name")
        out.append(x509.DNSName(host))
    return out


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_material(hosts: list[str], *, days: int = 30) -> TlsMaterial:
    """A fresh CA and a server certificate for a SuperLink reachable as ``hosts``.

    Args:
        hosts: Names and IP addresses clients use to reach the server (e.g. ``["server.lab.org",
            "10.0.0.5"]``; ``127.0.0.1`` / ``localhost`` for a loopback test).
        days: Validity of both certificates.

    Raises:
        ConfigError: No or malformed host, or ``days`` < 1.
    """
    if days < 1:
        raise ConfigError(f"TLS: days must be >= 1, got {days}")
    names = san_entries(hosts)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("shieldtune federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    first = hosts[0].strip()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(first))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key  # never returned: nobody can issue another certificate under this CA
    return TlsMaterial(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert=cert.public_bytes(serialization.Encoding.PEM),
        server_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
