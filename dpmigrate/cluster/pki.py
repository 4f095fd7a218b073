"""The local cluster's own certificate authority, for its etcd member.

`cluster up` makes a CA that exists only for that cluster, a server certificate for the etcd
member (valid for the bridge address it listens on) and one client certificate that the CLI
and the agents present. etcd then requires a client certificate from this CA on every
connection (``--client-cert-auth``): a process that reaches the store's port without one can
neither read nor change placements, rings or membership.

Keys are ECDSA P-256, made with ``cryptography`` (a dependency of paramiko, already
installed); files are 0600 in a 0700 folder. The CA's private key never reaches a disk: it
signs the two certificates and is dropped, so nothing can issue another one later.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dpmigrate.transports.tcp import tls_context

_VALID = datetime.timedelta(days=30)


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Where one party's TLS files are: the CA to trust, its certificate and key."""

    ca: str
    cert: str
    key: str

    def inside(self, folder: Path | str) -> TlsFiles:
        """The same file names in ``folder`` (a node sees its copies under its own path)."""
        return TlsFiles(*(str(Path(folder) / Path(p).name) for p in (self.ca, self.cert,
                                                                      self.key)))  # fmt: skip


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_ips: tuple[str, ...] = (),
    client: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server_ips:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))
                                         for ip in server_ips]), critical=False)  # fmt: skip
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_ips or server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make(folder: Path, server_ips: tuple[str, ...]) -> tuple[TlsFiles, TlsFiles]:
    """A new CA in ``folder`` (created 0700), the server's files and the clients' files, and
    the rings' (:func:`ring_files`: both ends of a TLS ring show it)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("dpmigrate cluster CA", ca_key, None, ca_key, ca=True)
    pem = serialization.Encoding.PEM
    _write(folder / "ca.pem", ca.public_bytes(pem))
    made = []
    # etcd's JSON gateway dials the member's own gRPC port with the server certificate as
    # its client certificate: the server's must allow client authentication too.
    for who, ips, client in (("server", server_ips, True), ("client", (), True),
                             ("ring", (), True)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"dpmigrate {'ring' if who == 'ring' else 'etcd ' + who}", key, ca.subject,
                     ca_key, server_ips=ips, client=client, server=who == "ring")  # fmt: skip
        _write(folder / f"{who}.pem", cert.public_bytes(pem))
        _write(folder / f"{who}.key", _key_pem(key))
        made.append(TlsFiles(str(folder / "ca.pem"), str(folder / f"{who}.pem"),
                             str(folder / f"{who}.key")))  # fmt: skip
    return made[0], made[1]


def ring_files(folder: Path | str) -> TlsFiles:
    """Where :func:`make` wrote the rings' TLS files in ``folder``."""
    return TlsFiles(*(str(Path(folder) / name) for name in ("ca.pem", "ring.pem", "ring.key")))


def ring_tls_context(folder: Path | str, *, server_side: bool) -> ssl.SSLContext:
    """A ring end's TLS context from the files :func:`make` wrote in ``folder``."""
    files = ring_files(folder)
    return tls_context(files.ca, files.cert, files.key, server_side=server_side)


def copy(files: TlsFiles, folder: Path) -> TlsFiles:
    """The client's files copied into ``folder`` (0700; files 0600): a node's agent sees only
    its own folder."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    rings = ring_files(Path(files.ca).parent)
    for src in (files.ca, files.cert, files.key, rings.cert, rings.key):
        if Path(src).exists():  # (a CA made before the rings had files: none of theirs)
            _write(folder / Path(src).name, Path(src).read_bytes())
    return files.inside(folder)
