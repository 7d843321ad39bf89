"""`fedllm certs`: test credentials whose private keys no one else can read, at any moment."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedllm.cli import main
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


def test_a_file_where_the_folder_should_be_is_named(tmp_path: Path, capsys) -> None:
    # h111: `fedllm certs t.sh` (an existing file) ended in a FileExistsError traceback
    script = tmp_path / "t.sh"
    script.write_text("echo hi\n")
    assert main(["certs", str(script)]) == 2
    assert f"{script} is a file, not a folder" in capsys.readouterr().err
    assert main(["certs", str(script / "creds")]) == 2
    assert f"cannot create the folder {script / 'creds'}" in capsys.readouterr().err
    assert script.read_text() == "echo hi\n"


@pytest.mark.parametrize("host", ["bad host!", "a..b", "-a.example.org", "x" * 64 + ".org", ""])
def test_a_host_that_is_no_dns_name_or_ip_address_is_refused(tmp_path: Path, host: str) -> None:
    # h111: `fedllm certs --host "bad host!"` wrote a certificate for a name no client can ask for
    with pytest.raises(ValueError, match=r"not a DNS name or IP address; .* e\.g\. "):
        make_credentials(tmp_path / "c", nodes=0, hosts=["localhost", host])
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_dns_names_and_ip_addresses_are_named_in_the_certificate(tmp_path: Path) -> None:
    hosts = ["superlink.example.org", "*.example.org", "10.0.0.5", "::1", "node-1.local."]
    creds = make_credentials(tmp_path, nodes=0, hosts=hosts)
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == [*hosts, "127.0.0.1"]
