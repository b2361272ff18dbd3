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
wrong and how to fix it.

Writing key material (:func:`write_dev_certificates`, :func:`write_node_keys`) is done
only into a directory the command owns: created with mode 0700 when new; refused when it
is a symbolic link, not owned by the current user, or writable by group or others (anyone
else able to write there could swap or pre-plant files). Every file is created under a
random temporary name with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (mode 0600 for private keys,
0644 for certificates and public keys), written, fsynced and renamed into place with
``os.replace`` relative to the directory's file descriptor; an existing destination is
never overwritten unless ``force=True`` and is refused, even then, when it is a symbolic
link. File names derived from user input (``--site``) must match :data:`SITE_NAME_RE`.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import MedfedError
from common.fsutil import atomic_write

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

#: A SuperNode name given to ``medfed certs --site``: it names the files ``<name>.pem`` /
#: ``<name>.key`` and the certificate's DNS SAN, so no path separator, no leading dot
#: and no ``..``; at most 63 characters (one DNS label).
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

#: Mode of a directory :func:`write_dev_certificates` / :func:`write_node_keys` create.
KEY_DIR_MODE = 0o700
#: Modes of the files they write.
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
#: Longest validity ``medfed certs --days`` accepts (100 years).
MAX_VALID_DAYS = 36500


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


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a safe SuperNode name for ``medfed certs --site``.

    Parameters
    ----------
    name : str
        The name; it becomes the file names ``<name>.pem`` / ``<name>.key`` and the
        certificate's DNS SAN.

    Returns
    -------
    str
        ``name`` unchanged.

    Raises
    ------
    TLSError
        If ``name`` does not match :data:`SITE_NAME_RE` or contains ``..`` (a path
        separator, a leading dot or ``..`` could place a key outside the output folder).

    """
    if not SITE_NAME_RE.match(name) or ".." in name:
        raise TLSError(
            f"--site {name!r} is not a valid SuperNode name: use 1-63 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, with no '/' and no '..' "
            "(e.g. --site supernode-1); it names the files <name>.pem/<name>.key inside "
            "the output folder."
        )
    return name


def _open_key_dir(out_dir: Path) -> int:
    """Create (0700) or check ``out_dir`` and return an ``O_DIRECTORY`` descriptor of it.

    Raises
    ------
    TLSError
        If ``out_dir`` is a symbolic link or not a directory, is not owned by the current
        user, is writable by group or others, or cannot be created or opened.

    """
    if out_dir.is_symlink():
        raise TLSError(
            f"{out_dir} is a symbolic link; refusing to write key material through it. "
            "Pass the real directory (or a new one) as the output folder."
        )
    created = False
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(mode=KEY_DIR_MODE)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise TLSError(
            f"cannot create the output folder {out_dir} ({exc.strerror}); choose a folder "
            "you can write to."
        ) from None
    try:
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TLSError(
                f"{out_dir} is a symbolic link; refusing to write key material through it."
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise TLSError(
                f"{out_dir} exists and is not a directory; choose another folder."
            ) from None
        raise TLSError(f"cannot open the output folder {out_dir} ({exc.strerror}).") from None
    try:
        st = os.fstat(fd)
        if created:
            os.fchmod(fd, KEY_DIR_MODE)  # the umask may have cleared bits; never widens
        elif st.st_uid != os.geteuid():
            raise TLSError(
                f"{out_dir} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); its "
                "owner could replace the keys written there. Use a folder you own, or a new "
                "one (it is created with mode 0700)."
            )
        elif st.st_mode & 0o022:
            raise TLSError(
                f"{out_dir} is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); anyone who can write there could swap the "
                f"key files. Run `chmod go-w {out_dir}` (or `chmod 700`), or use a new folder."
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _existing(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` inside ``dir_fd`` (a symbolic link is not followed)."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _refuse_existing(
    out_dir: Path, dir_fd: int, names: Iterable[str], *, force: bool, hint: str
) -> None:
    """Raise unless every ``names`` entry is absent, or (``force``) a replaceable file.

    Raises
    ------
    TLSError
        A destination is a symbolic link or not a regular file (always), or exists and
        ``force`` is false (``hint`` says what replacing it means).

    """
    for name in names:
        st = _existing(dir_fd, name)
        if st is None:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise TLSError(
                f"{out_dir / name} is a symbolic link; refusing to write key material "
                "there (even with --force). Remove the link and run the command again."
            )
        if not stat.S_ISREG(st.st_mode):
            raise TLSError(f"{out_dir / name} exists and is not a regular file; remove it.")
        if not force:
            raise TLSError(f"{out_dir / name} already exists; {hint}")


def _write_file(out_dir: Path, dir_fd: int, name: str, data: bytes, *, mode: int) -> Path:
    """Write ``data`` as ``name`` in the directory ``dir_fd`` (:func:`~common.fsutil.atomic_write`).

    The temporary file gets a random name and is created with ``O_CREAT | O_EXCL |
    O_NOFOLLOW`` and ``mode``, so a planted file or link is never opened; it is fsynced
    and renamed over ``name`` (a rename replaces a link, it does not follow it).

    Raises
    ------
    TLSError
        If the destination is a symbolic link, or on any OS error.

    """
    st = _existing(dir_fd, name)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise TLSError(f"{out_dir / name} is a symbolic link; refusing to write key material.")
    try:
        atomic_write(name, lambda fh: fh.write(data), mode=mode, dir_fd=dir_fd)
    except OSError as exc:
        raise TLSError(f"cannot write {out_dir / name} ({exc.strerror}).") from None
    return out_dir / name


def _write_all(
    out_dir: Path, files: Sequence[tuple[str, bytes, int]], *, force: bool, hint: str
) -> None:
    """Write ``(name, data, mode)`` files into ``out_dir`` (see :func:`_open_key_dir`).

    Every destination is checked before the first file is written, so a refusal leaves
    the folder as it was.

    Raises
    ------
    TLSError
        From :func:`_open_key_dir`, :func:`_refuse_existing` or :func:`_write_file`.

    """
    dir_fd = _open_key_dir(out_dir)
    try:
        _refuse_existing(out_dir, dir_fd, [n for n, _, _ in files], force=force, hint=hint)
        for name, data, mode in files:
            _write_file(out_dir, dir_fd, name, data, mode=mode)  # fsyncs file and directory
    finally:
        os.close(dir_fd)


def _check_days(valid_days: int) -> None:
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise TLSError(
            f"--days {valid_days} must be between 1 and {MAX_VALID_DAYS} (development "
            "certificates; renew them with `medfed certs --force`)."
        )


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


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    valid_days: int,
    latest: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """Return a certificate builder with names, key, serial and the validity window.

    The window starts 5 minutes ago (clock skew between machines) and lasts
    ``valid_days`` (checked), ending no later than ``latest`` (the issuer's own expiry).
    """
    _check_days(valid_days)
    start = _now() - dt.timedelta(minutes=5)
    until = start + dt.timedelta(days=valid_days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(until if latest is None else min(until, latest))
    )


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
        As :func:`issue_server_certificate` (``valid_days``, ``ips``).

    """
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medfed development CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, valid_days=valid_days)
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
        If ``valid_days`` is not in ``[1, MAX_VALID_DAYS]`` or an ``ips`` entry is not an
        IP address.

    """
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = next(iter(hosts), "localhost") or "localhost"
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]),
            ca_cert.subject,
            server_key,
            valid_days=valid_days,
            latest=ca_cert.not_valid_after_utc,
        )
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
    which its SuperExec reaches over TLS in the compose deployment. See the module
    docstring for how the folder and the files are created.

    Raises
    ------
    TLSError
        If a ``sites`` name is invalid (see :func:`check_site_name`) or would replace
        the CA or server files, an ``ips`` entry is not an IP address, the folder is
        unsafe (a symbolic link, not yours, group/world-writable), a destination is a
        symbolic link, or a file exists and ``force`` is false. Nothing is written then.

    """
    names = list(dict.fromkeys(check_site_name(n) for n in sites))
    reserved = {Path(f).stem for f in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    clash = [n for n in names if n in reserved]
    if clash:
        raise TLSError(
            f"--site {clash[0]!r} would overwrite the CA or SuperLink files "
            f"({CA_KEY}, {SERVER_KEY}, ...); name the SuperNode differently, e.g. supernode-1."
        )
    paths = CertPaths(
        out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY
    )
    ca_key, ca_cert, server_key, server_cert = generate_dev_certificates(
        hosts=hosts, ips=ips, valid_days=valid_days
    )
    pem = serialization.Encoding.PEM
    files: list[tuple[str, bytes, int]] = [
        (CA_KEY, _pem_key(ca_key), PRIVATE_MODE),
        (SERVER_KEY, _pem_key(server_key), PRIVATE_MODE),
        (CA_CERT, ca_cert.public_bytes(pem), PUBLIC_MODE),
        (SERVER_CERT, server_cert.public_bytes(pem), PUBLIC_MODE),
    ]
    for name in names:
        key, cert = issue_server_certificate(
            ca_key, ca_cert, hosts=[name], ips=[], valid_days=valid_days
        )
        files += [(f"{name}.key", _pem_key(key), PRIVATE_MODE)]
        files += [(f"{name}.pem", cert.public_bytes(pem), PUBLIC_MODE)]
    _write_all(
        out_dir,
        files,
        force=force,
        hint="refusing to overwrite certificates or keys. Pass --force to replace them "
        "(clients must then get the new CA).",
    )
    log.info("wrote development CA and server certificate to %s", out_dir)
    return paths


def write_node_keys(out_dir: Path, *, force: bool = False) -> KeyPaths:
    """Write a SuperNode authentication key pair (EC P-384, OpenSSH format).

    Files: ``supernode.key`` (OpenSSH private key, 0600) and ``supernode.key.pub``
    (``ecdsa-sha2-nistp384 ...``), the file the coordinator registers with
    ``flwr supernode register``. See the module docstring for how the folder and the
    files are created.

    Raises
    ------
    TLSError
        If the folder is unsafe (a symbolic link, not yours, group/world-writable), a
        destination is a symbolic link, or either file exists and ``force`` is false.

    """
    paths = KeyPaths(out_dir / NODE_KEY, out_dir / NODE_PUB)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_all(
        out_dir,
        [(NODE_KEY, private, PRIVATE_MODE), (NODE_PUB, public + b"\n", PUBLIC_MODE)],
        force=force,
        hint="refusing to overwrite this site's key. Pass --force to replace it (the "
        "coordinator must then register the new key).",
    )
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
