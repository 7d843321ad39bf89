"""Is a run's app fedllm's own? A SuperNode runs only the fedllm installed on it: the app Flower
hands it may hold nothing but fedllm's wrapper (a pyproject naming fedllm's components, a README,
Flower's manifest), checked here before anything of it is used."""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

# the files of fedllm's FAB (`flwr run` adds .info/CONTENT; Flower removes it when installing)
# what fedllm's app declares; a SuperNode runs a run's ClientApp only when its FAB says exactly this
APP_COMPONENTS: dict[str, str] = {
    "serverapp": "fedllm.deploy.apps:server_app",
    "clientapp": "fedllm.deploy.apps:client_app",
}


APP_FILES = frozenset({"pyproject.toml", "README.md", ".info/CONTENT"})


MAX_PYPROJECT_BYTES = 64 * 1024


def check_app(names: Iterable[str], pyproject: bytes | None, *, where: str) -> None:
    """Refuse an app that is not fedllm's own wrapper: any file besides `APP_FILES` (code), or
    components other than `APP_COMPONENTS`."""
    names = set(names)
    extra = sorted(names - APP_FILES)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(
            f"{where} holds {', '.join(extra[:5])}{more}: this node runs only its installed "
            f"fedllm, whose app carries no code (valid files: {', '.join(sorted(APP_FILES))}); "
            "submit runs with `fedllm run RECIPE --federation CONN`"
        )
    try:
        declared = tomllib.loads((pyproject or b"").decode())["tool"]["flwr"]["app"]
        components = declared["components"]
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        components = None
    if components != APP_COMPONENTS:
        raise ValueError(
            f"{where} declares components {components}; this node runs only fedllm's own "
            f"{APP_COMPONENTS} (submit runs with `fedllm run RECIPE --federation CONN`)"
        )


def check_fab(content: bytes) -> None:
    """Refuse a run's FAB unless it is fedllm's own app (`check_app`); reads only its file names
    and its small pyproject.toml, never extracts it."""
    where = f"the run's app (FAB sha256 {hashlib.sha256(content).hexdigest()[:12]})"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = [i.filename for i in fab.infolist() if not i.is_dir()]
            if set(names) - APP_FILES:  # refuse on the names alone, before reading anything
                check_app(names, None, where=where)
            pyproject = None
            if "pyproject.toml" in names:
                info = fab.getinfo("pyproject.toml")
                if info.file_size > MAX_PYPROJECT_BYTES:
                    raise ValueError(f"{where}: its pyproject.toml is {info.file_size} bytes")
                pyproject = fab.read(info)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{where} is not a FAB (a zip file): {err}") from None
    check_app(names, pyproject, where=where)


def check_app_dir(folder: Path) -> None:
    """`check_app` on an installed app folder (what Flower puts on a ClientApp's sys.path)."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    pyproject = folder / "pyproject.toml"
    data = pyproject.read_bytes()[:MAX_PYPROJECT_BYTES] if pyproject.is_file() else None
    check_app(names, data, where=f"the run's app in {folder}")
