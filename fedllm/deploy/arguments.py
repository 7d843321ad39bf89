"""Checks of `fedllm superlink` and `fedllm node` arguments, made before any process starts.

Flower checks its own flags only once its process runs, and then names the flag but not the
path (or ends in an `ssl.SSLError: [SSL] PEM lib` traceback after "SuperLink on ..."). Each
check here raises a ValueError / FileNotFoundError naming the flag, the path and what the file
should hold, which `fedllm` prints as one `fedllm: error: ...` line.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8, SEC1 ("EC PRIVATE KEY"), RSA and OpenSSH headers


def check_superlink_address(address: str) -> str:
    """`address` if it is HOST:PORT (an IPv6 host in brackets); a ValueError naming --superlink
    otherwise: without a port Flower would try a default one, not the SuperLink's."""
    host, sep, port = address.rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if (
        not sep
        or not host.strip("[]")
        or bare_ipv6
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ValueError(
            f"--superlink {address!r}: give the SuperLink's HOST:PORT, e.g. 127.0.0.1:9093, "
            "superlink.example.org:9093 or [::1]:9093"
        )
    return address


def existing_file(flag: str, path: Path) -> Path:
    """`path` (with ~ expanded) if it is a file; else a FileNotFoundError naming flag and path."""
    full = Path(path).expanduser()
    if not full.is_file():
        what = "a folder, not a file" if full.is_dir() else "no such file"
        raise FileNotFoundError(f"{flag} {path}: {what}")
    return full


def _read(flag: str, path: Path) -> bytes:
    """The bytes of an existing credential file; a ValueError naming it if it cannot be read."""
    full = existing_file(flag, path)
    try:
        return full.read_bytes()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err.strerror})") from None


def _swapped(found: str, flag: str, *, other: str | None) -> str:
    """The end of a refusal of a file holding `found` (the other kind of PEM file)."""
    if other is None:
        return f"; it holds {found}"
    return f"; it holds {found}: are {flag} and {other} swapped?"


def check_certificate(flag: str, path: Path, *, other: str | None = None) -> list[x509.Certificate]:
    """The PEM certificates in a file (leaf first); refuse a file that holds none (e.g. the
    private key, given for flag `other` in its place)."""
    data = _read(flag, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        end = _swapped("a private key", flag, other=other) if PRIVATE_KEY in data else ""
        raise ValueError(
            f"{flag} {path}: expected a PEM certificate (a file starting "
            f"{CERTIFICATE.decode()}){end}"
        ) from None


def check_private_key(flag: str, path: Path, *, other: str | None = None) -> None:
    """Refuse a file that holds no unencrypted PEM private key (e.g. the certificate, given for
    flag `other` in its place)."""
    data = _read(flag, path)
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a passphrase: the SuperLink is given none
        raise ValueError(
            f"{flag} {path}: the private key is encrypted; the SuperLink needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        end = _swapped("a certificate", flag, other=other) if CERTIFICATE in data else ""
        raise ValueError(
            f"{flag} {path}: expected a PEM private key (a file starting -----BEGIN PRIVATE "
            f"KEY----- or -----BEGIN EC PRIVATE KEY-----){end}"
        ) from None


def check_server_tls(*, ca: Path, cert: Path, key: Path) -> None:
    """The SuperLink's TLS files: a CA certificate, its certificate and the matching private key,
    loaded as the SuperLink will load them (`ssl.SSLContext`), each refusal naming its file."""
    authorities = check_certificate("--ssl-ca-certfile", ca)
    chain = check_certificate("--ssl-certfile", cert, other="--ssl-keyfile")
    check_private_key("--ssl-keyfile", key, other="--ssl-certfile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=Path(ca).expanduser())
    except ssl.SSLError as err:
        raise ValueError(
            f"--ssl-ca-certfile {ca}: not a usable CA certificate ({err.reason or err})"
        ) from None
    try:
        context.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    except ssl.SSLError as err:
        raise ValueError(
            f"--ssl-keyfile {key} is not the private key of --ssl-certfile {cert} "
            f"({err.reason or err}); pass the key the certificate was made for"
        ) from None
    check_chain(authorities, chain, ca=ca, cert=cert)


def check_chain(
    authorities: list[x509.Certificate], chain: list[x509.Certificate], *, ca: Path, cert: Path
) -> None:
    """Refuse a server certificate (`chain`, read from `cert`: leaf, then any intermediates) the
    CA (`authorities`, read from `ca`) did not issue, or one outside its validity window: every
    SuperNode given that CA would refuse the SuperLink at its TLS handshake, far from the cause."""
    now = dt.datetime.now(dt.UTC)
    for c, flag, path in [
        (chain[0], "--ssl-certfile", cert),
        *((a, "--ssl-ca-certfile", ca) for a in authorities),
    ]:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ValueError(
                f"{flag} {path}: valid {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; make new credentials "
                "(`fedllm certs --force`)"
            )
    current, rest = chain[0], list(chain[1:])
    while not any(_issued(current, by=a) for a in authorities):
        parent = next((c for c in rest if _issued(current, by=c)), None)
        if parent is None:
            issuer, subject = chain[0].issuer, authorities[0].subject
            same = " (the same name, another key: another `fedllm certs` folder's CA?)"
            same = same if issuer == subject else ""
            raise ValueError(
                f"--ssl-certfile {cert} (issued by {issuer.rfc4514_string()}) was not issued by "
                f"--ssl-ca-certfile {ca} ({subject.rfc4514_string()}){same}: "
                "SuperNodes given that CA would refuse the SuperLink; pass the CA that signed "
                "the certificate"
            )
        current = parent
        rest.remove(parent)


def _issued(cert: x509.Certificate, *, by: x509.Certificate) -> bool:
    """Whether `by`'s key signed `cert` and `by` is named as its issuer."""
    try:
        cert.verify_directly_issued_by(by)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_node_credentials(root_certificates: Path | None, auth_key: Path | None) -> None:
    """A SuperNode's CA certificate (PEM) and its authentication key (an OpenSSH ECDSA private
    key, what Flower's SuperNode reads), each checked if given (`supernode_command` refuses a
    secure node without them)."""
    if root_certificates is not None:
        check_certificate("--root-certificates", root_certificates)
    if auth_key is not None:
        check_auth_key(auth_key)


def check_auth_key(auth_key: Path) -> None:
    """Refuse an --auth-key that is no unencrypted OpenSSH ECDSA private key (e.g. its .pub)."""
    data = _read("--auth-key", auth_key)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        hint = (
            " (it is a public key: pass the private key, the file without .pub)"
            if data.startswith(b"ecdsa-sha2-")
            else ""
        )
        raise ValueError(
            f"--auth-key {auth_key}: not an unencrypted OpenSSH ECDSA private key (a file "
            "starting -----BEGIN OPENSSH PRIVATE KEY-----, as `fedllm certs` or "
            f"`ssh-keygen -t ecdsa` write){hint}"
        )
