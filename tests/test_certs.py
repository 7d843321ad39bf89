"""`fedllm certs`: test credentials whose private keys no one else can read, at any moment."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedllm.deploy.certs import make_credentials


def test_private_keys_are_0600_and_a_planted_symlink_is_replaced_not_followed(
    tmp_path: Path,
) -> None:
    """The key was written at the umask's mode and chmod-ed after, and written through a symlink
    planted at its path (audit h90): now a private file renamed into place."""
    out = tmp_path / "creds"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a key")
    (out / "server.key").symlink_to(target)
    creds = make_credentials(out, nodes=2, force=True)
    for key in (creds.server_key, *creds.node_keys):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert not key.is_symlink() and b"PRIVATE KEY" in key.read_bytes()
    assert target.read_text() == "not a key"  # the link's target untouched
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_existing_credentials_are_refused_unless_forced(tmp_path: Path) -> None:
    # h95: a second `fedllm certs` replaced the CA and every key a running SuperLink used
    first = make_credentials(tmp_path, nodes=1)
    ca = first.ca_cert.read_bytes()
    with pytest.raises(ValueError, match=r"already holds credentials .*--force"):
        make_credentials(tmp_path, nodes=1)
    assert first.ca_cert.read_bytes() == ca
    assert make_credentials(tmp_path, nodes=1, force=True).ca_cert.read_bytes() != ca
    make_credentials(tmp_path / "other", nodes=1)  # a new folder needs no --force
