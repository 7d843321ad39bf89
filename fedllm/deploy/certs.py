"""Test credentials for a secured loopback federation: a CA, a SuperLink certificate, node keys.

`fedllm certs DIR` writes what docs/deployment.md walks through by hand with openssl/ssh-keygen:
- `ca.crt`/`ca.key`: a self-signed certificate authority (SuperNodes and `flwr` trust `ca.crt`);
- `server.pem`/`server.key`: the SuperLink's TLS certificate, signed by the CA, valid for the
  given host names / IP addresses (default 127.0.0.1 and localhost);
- `node-<i>` / `node-<i>.pub`: one ECDSA P-384 key pair per SuperNode in OpenSSH format, which
  is what Flower's SuperNode authentication expects (`flwr supernode register node-<i>.pub`).
For tests and trials only: production keys belong to each organisation and never leave it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Credentials:
    """Paths of everything `make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same path + ".pub"

    def node_public(self, i: int) -> Path:
        """The public key of SuperNode `i`, the one to register: its private key's path + ".pub"."""
        return self.node_keys[i].with_name(self.node_keys[i].name + ".pub")


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, *, fmt: serialization.PrivateFormat):
    """The key in a file that is 0600 from its creation, written beside and renamed into place:
    never readable by others for a moment, and a symlink planted at `path` is replaced, not
    followed (audit h90)."""
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(host: str) -> str:
    """`host` if a certificate can name it: an IP address, or a DNS name (labels of letters,
    digits and inner hyphens, at most 253 characters; `*.` first for a wildcard). Else a
    ValueError naming it: a certificate for a name no client can ask for is of no use."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.removeprefix("*.").removesuffix(".").split(".")
    if len(host) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"--host {host!r}: not a DNS name or IP address; give the name or address "
            "SuperNodes connect to, e.g. superlink.example.org, 10.0.0.5 or ::1"
        )
    return host


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _make_folder(out: Path) -> None:
    """Create the credentials folder; a file (or a file among its parents) in the way is a
    ValueError naming it, not a FileExistsError traceback."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{out} is a file, not a folder; name a folder for the credentials (a new one is "
            "created)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a parent that is a file, or no permission
        raise ValueError(f"cannot create the folder {out}: {err.strerror}") from None


def credential_files(folder: Path, *, nodes: int) -> list[Path]:
    """The files `make_credentials` writes into `folder` for `nodes` node key pairs."""
    fixed = [folder / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")]
    return fixed + [folder / f"node-{i}{ext}" for i in range(nodes) for ext in ("", ".pub")]


def make_credentials(
    folder: str | Path,
    *,
    nodes: int = 3,
    hosts: list[str] | None = None,
    days: int = 30,
    force: bool = False,
) -> Credentials:
    """Write a test CA, a CA-signed server certificate for `hosts`, and `nodes` node key pairs;
    existing credentials in `folder` are refused unless `force` (a running SuperLink or a
    registered node would stop matching them)."""
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days} (the certificates would be expired)")
    for host in hosts or []:
        check_host(host)
    out = Path(folder)
    there = [p.name for p in credential_files(out, nodes=nodes) if p.exists() or p.is_symlink()]
    if there and not force:
        raise ValueError(
            f"{out} already holds credentials ({', '.join(there[:4])}"
            f"{', ...' if len(there) > 4 else ''}); new ones would replace the CA and every key "
            "a running SuperLink or a registered node uses: pass --force to replace them, or "
            "name another folder"
        )
    _make_folder(out)
    # Flower's ServerApp runner reaches the SuperLink over loopback: always name 127.0.0.1
    hosts = list(dict.fromkeys([*(hosts or ["127.0.0.1", "localhost"]), "127.0.0.1"]))
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key, ca_cert = _ca(now=now, until=until)
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", ca_key, fmt=serialization.PrivateFormat.PKCS8)
    server_key, server_cert = _server(hosts, ca=(ca_cert, ca_key), now=now, until=until)
    (out / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", server_key, fmt=serialization.PrivateFormat.PKCS8)

    keys = []
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = out / f"node-{i}"
        _write_key(path, key, fmt=serialization.PrivateFormat.OpenSSH)
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path.with_name(path.name + ".pub").write_bytes(pub + f" fedllm-node-{i}\n".encode())
        keys.append(path)
    return Credentials(out / "ca.crt", out / "server.pem", out / "server.key", tuple(keys))


def _ca(
    *, now: dt.datetime, until: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (key, certificate) that may sign leaf certificates only."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedllm test CA"))
        .issuer_name(_name("fedllm test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def _server(
    hosts: list[str],
    *,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    now: dt.datetime,
    until: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's (key, certificate) for `hosts` (the first is its subject), signed by `ca`."""
    ca_cert, ca_key = ca
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert
