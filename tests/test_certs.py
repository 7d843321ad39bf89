"""`fedllm certs`: test credentials whose private keys no one else can read, at any moment."""

from __future__ import annotations

import stat
from pathlib import Path

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
    creds = make_credentials(out, nodes=2)
    for key in (creds.server_key, *creds.node_keys):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert not key.is_symlink() and b"PRIVATE KEY" in key.read_bytes()
    assert target.read_text() == "not a key"  # the link's target untouched
    assert not list(out.glob(".*"))  # no temporary file left behind
