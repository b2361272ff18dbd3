"""Development certificates and SuperNode keys: generation and checked loading.

Everything here uses the ``cryptography`` package (X.509 builder, EC keys); medfed
implements no primitive itself (DESIGN section 6). Two artefacts exist:

* a development CA and a server certificate for the SuperLink (and, in the compose
  deployment, for each SuperNode's Runtime API), PEM encoded. Its SANs must name every
  host and address clients use; Flower's SuperExec reaches the SuperLink on
  ``127.0.0.1``, so that address is always included.
* a hospital's SuperNode key pair for node authentication: EC P-384 with both halves in
  OpenSSH format, which is what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register KEY.pub`` load (``load_ssh_private_key`` /
  ``load_ssh_public_key``, NIST curves only).

Loading functions check type, expiry and SAN and raise :class:`TLSError` saying what is
wrong and how to fix it. Private keys are written with mode 0600 and never overwritten
unless ``force=True``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import MedfedError

log = logging.getLogger(__name__)

#: Names and addresses every server certificate carries (Flower's SuperExec connects to
#: the SuperLink's Runtime API on 127.0.0.1 when it runs as a subprocess).
LOOPBACK_NAMES: tuple[str, ...] = ("localhost",)
LOOPBACK_IPS: tuple[str, ...] = ("127.0.0.1", "::1")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_KEY = "supernode.key"
NODE_PUB = "supernode.key.pub"

#: NIST curves Flower accepts for SuperNode authentication.
NODE_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class TLSError(MedfedError, ValueError):
    """A certificate or key is missing, of the wrong type, expired or names the wrong host."""


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`write_dev_certificates`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class KeyPaths:
    """Files written by :func:`write_node_keys`."""

    private_key: Path
    public_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_new(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with ``mode``; refuse to replace a file unless ``force``."""
    if path.exists() and not force:
        raise TLSError(
            f"{path} already exists; refusing to overwrite key material. "
            "Pass --force (force=True) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.chmod(mode)
    tmp.replace(path)


def _san_list(hosts: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in [*hosts, *LOOPBACK_NAMES]:
        if h and h not in seen:
            seen.add(h)
            names.append(x509.DNSName(h))
    for a in [*ips, *LOOPBACK_IPS]:
        if a and a not in seen:
            seen.add(a)
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(a)))
            except ValueError as exc:
                raise TLSError(
                    f"--ip {a!r} is not an IP address ({exc}); use --host for names"
                ) from exc
    return names


def generate_dev_certificates(
    *,
    hosts: Sequence[str],
    ips: Sequence[str],
    valid_days: int = 365,
) -> tuple[
    ec.EllipticCurvePrivateKey, x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate
]:
    """Create a development CA and a server certificate signed by it.

    Parameters
    ----------
    hosts : Sequence[str]
        DNS names clients use for the server (e.g. ``superlink``, a public host name);
        ``localhost`` is always added.
    ips : Sequence[str]
        IP addresses clients use; ``127.0.0.1`` and ``::1`` are always added.
    valid_days : int
        Validity of both certificates in days, >= 1.

    Returns
    -------
    tuple
        ``(ca_key, ca_cert, server_key, server_cert)``; keys are EC P-384, signatures
        ECDSA-SHA384 (RFC 5280 profile: CA with ``BasicConstraints(ca=True)``, server
        certificate with ``serverAuth`` EKU and the SANs).

    Raises
    ------
    TLSError
        If ``valid_days`` < 1 or an ``ips`` entry is not an IP address.

    """
    if valid_days < 1:
        raise TLSError(f"valid_days must be >= 1, got {valid_days}")
    now = _now() - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medfed development CA")])
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
                digital_signature=True,
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
        .sign(ca_key, hashes.SHA384())
    )
    server_key, server_cert = issue_server_certificate(
        ca_key, ca_cert, hosts=hosts, ips=ips, valid_days=valid_days
    )
    return ca_key, ca_cert, server_key, server_cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    hosts: Sequence[str],
    ips: Sequence[str],
    valid_days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate (EC P-384, ECDSA-SHA384) signed by ``ca_key``.

    SANs: ``hosts`` + ``localhost`` as DNS names, ``ips`` + 127.0.0.1/::1 as IP
    addresses; extended key usage ``serverAuth`` (RFC 5280 section 4.2.1.12).

    Raises
    ------
    TLSError
        If ``valid_days`` < 1 or an ``ips`` entry is not an IP address.

    """
    if valid_days < 1:
        raise TLSError(f"valid_days must be >= 1, got {valid_days}")
    now = _now() - dt.timedelta(minutes=5)
    until = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = next(iter(hosts), "localhost") or "localhost"
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_list(hosts, ips)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_dev_certificates(
    out_dir: Path,
    *,
    hosts: Sequence[str],
    ips: Sequence[str],
    valid_days: int = 365,
    sites: Sequence[str] = (),
    force: bool = False,
) -> CertPaths:
    """Generate (see :func:`generate_dev_certificates`) and write the CA and server files.

    Files: ``ca.crt``, ``ca.key`` (0600), ``server.pem``, ``server.key`` (0600), and
    for every name in ``sites`` (a SuperNode's host name, e.g. ``supernode-1``) a
    certificate ``<name>.pem`` + key ``<name>.key`` for that SuperNode's Runtime API,
    which its SuperExec reaches over TLS in the compose deployment.

    Raises
    ------
    TLSError
        If a file exists and ``force`` is false (nothing is written then).

    """
    paths = CertPaths(
        out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY
    )
    site_files = [(out_dir / f"{n}.pem", out_dir / f"{n}.key", n) for n in sites]
    if not force:
        for p in (
            paths.ca_cert,
            paths.ca_key,
            paths.server_cert,
            paths.server_key,
            *(f for c, k, _ in site_files for f in (c, k)),
        ):
            if p.exists():
                raise TLSError(
                    f"{p} already exists; refusing to overwrite certificates or keys. "
                    "Pass --force to replace them (clients must then get the new CA)."
                )
    ca_key, ca_cert, server_key, server_cert = generate_dev_certificates(
        hosts=hosts, ips=ips, valid_days=valid_days
    )
    pem = serialization.Encoding.PEM
    _write_new(paths.ca_key, _pem_key(ca_key), mode=0o600, force=True)
    _write_new(paths.server_key, _pem_key(server_key), mode=0o600, force=True)
    _write_new(paths.ca_cert, ca_cert.public_bytes(pem), mode=0o644, force=True)
    _write_new(paths.server_cert, server_cert.public_bytes(pem), mode=0o644, force=True)
    for cert_path, key_path, name in site_files:
        key, cert = issue_server_certificate(
            ca_key, ca_cert, hosts=[name], ips=[], valid_days=valid_days
        )
        _write_new(key_path, _pem_key(key), mode=0o600, force=True)
        _write_new(cert_path, cert.public_bytes(pem), mode=0o644, force=True)
    log.info("wrote development CA and server certificate to %s", out_dir)
    return paths


def write_node_keys(out_dir: Path, *, force: bool = False) -> KeyPaths:
    """Write a SuperNode authentication key pair (EC P-384, OpenSSH format).

    Files: ``supernode.key`` (OpenSSH private key, 0600) and ``supernode.key.pub``
    (``ecdsa-sha2-nistp384 ...``), the file the coordinator registers with
    ``flwr supernode register``.

    Raises
    ------
    TLSError
        If either file exists and ``force`` is false.

    """
    paths = KeyPaths(out_dir / NODE_KEY, out_dir / NODE_PUB)
    if not force:
        for p in (paths.private_key, paths.public_key):
            if p.exists():
                raise TLSError(
                    f"{p} already exists; refusing to overwrite this site's key. Pass "
                    "--force to replace it (the coordinator must then register the new key)."
                )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_new(paths.private_key, private, mode=0o600, force=True)
    _write_new(paths.public_key, public + b"\n", mode=0o644, force=True)
    log.info("wrote SuperNode key pair to %s", out_dir)
    return paths


# ---------------------------------------------------------------------- checked loading
def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise TLSError(
            f"{what} {path} does not exist; create it with `medfed certs` / "
            "`medfed site keys` or fix the path."
        )
    return path.read_bytes()


def load_certificate(
    path: Path,
    *,
    expect_ca: bool | None = None,
    names: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Load a PEM certificate and check its validity period, role and SANs.

    Parameters
    ----------
    path : pathlib.Path
        PEM file.
    expect_ca : bool or None
        ``True``: must be a CA certificate; ``False``: must be a leaf; ``None``: either.
    names : Sequence[str]
        Host names or IP addresses the certificate must cover (SAN DNS / IP entries).
    now : datetime, optional
        Reference time (UTC) for the expiry check; defaults to now.

    Raises
    ------
    TLSError
        Not PEM / not a certificate, not yet valid or expired, wrong role, or a name
        missing from the SANs (the message lists the SANs it has).

    """
    data = _read(path, "certificate")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise TLSError(f"{path} is not a PEM X.509 certificate ({exc}).") from exc
    now = now or _now()
    if now < cert.not_valid_before_utc:
        raise TLSError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC."
        )
    if now > cert.not_valid_after_utc:
        raise TLSError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d} UTC; issue a new one "
            "with `medfed certs --force`."
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if expect_ca is True and not is_ca:
        raise TLSError(f"{path} is not a CA certificate; pass the CA file (ca.crt).")
    if expect_ca is False and is_ca:
        raise TLSError(f"{path} is a CA certificate; pass the server certificate (server.pem).")
    if names:
        missing = [n for n in names if not certificate_covers(cert, n)]
        if missing:
            raise TLSError(
                f"{path} does not name {missing} in its subjectAltName (it has "
                f"{sorted(certificate_names(cert))}); re-issue it with `medfed certs "
                + " ".join(f"--host {m}" for m in missing)
                + " --force`."
            )
    return cert


def certificate_names(cert: x509.Certificate) -> set[str]:
    """DNS names and IP addresses in the certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    }


def certificate_covers(cert: x509.Certificate, name: str) -> bool:
    """Whether ``name`` (host or IP, no wildcards matched) is in the SANs."""
    try:
        name = str(ipaddress.ip_address(name))
    except ValueError:
        name = name.lower()
    return name in {n.lower() for n in certificate_names(cert)}


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a PEM or OpenSSH EC private key, checking type and file permissions.

    Raises
    ------
    TLSError
        Unreadable, encrypted, not an EC key, or readable by group/others.

    """
    data = _read(path, "private key")
    if path.stat().st_mode & 0o077:
        raise TLSError(f"{path} is readable by other users; run `chmod 600 {path}`.")
    key: object
    try:
        if data.startswith(b"-----BEGIN OPENSSH"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"{path} is not an unencrypted PEM/OpenSSH private key ({exc}).") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"{path} holds a {type(key).__name__}; medfed uses EC keys.")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a SuperNode public key (OpenSSH format, NIST EC curve) as Flower wants it.

    Raises
    ------
    TLSError
        Not OpenSSH, not EC, or not a NIST curve Flower accepts.

    """
    data = _read(path, "public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSError(
            f"{path} is not an OpenSSH public key ({exc}); generate one with `medfed site keys`."
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NODE_CURVES:
        raise TLSError(
            f"{path} is not an EC key on a NIST curve {list(NODE_CURVES)}; Flower's node "
            "authentication refuses it. Generate one with `medfed site keys`."
        )
    return key


def check_server_files(
    cert_path: Path, key_path: Path, ca_path: Path, *, names: Sequence[str] = ()
) -> None:
    """Check a server certificate, its key and its CA belong together and cover ``names``.

    Raises
    ------
    TLSError
        Any problem found by :func:`load_certificate` / :func:`load_private_key`, a key
        that does not match the certificate, or a certificate the CA did not sign.

    """
    ca = load_certificate(ca_path, expect_ca=True)
    cert = load_certificate(cert_path, expect_ca=False, names=names)
    key = load_private_key(key_path)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        raise TLSError(f"{key_path} is not the private key of {cert_path}.")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise TLSError(f"{cert_path} was not issued by the CA in {ca_path} ({exc}).") from exc


def check_node_key_pair(private_path: Path, public_path: Path) -> None:
    """Check a SuperNode key pair: EC NIST curve, OpenSSH public half, halves match.

    Raises
    ------
    TLSError
        On any mismatch or wrong type.

    """
    key = load_private_key(private_path)
    pub = load_node_public_key(public_path)
    if key.curve.name not in NODE_CURVES:
        raise TLSError(f"{private_path} uses curve {key.curve.name}; use P-384.")
    fmt = serialization.PublicFormat.OpenSSH
    enc = serialization.Encoding.OpenSSH
    if key.public_key().public_bytes(enc, fmt) != pub.public_bytes(enc, fmt):
        raise TLSError(f"{public_path} is not the public half of {private_path}.")
