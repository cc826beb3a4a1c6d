"""Checks that the `equinox` a test session imports is this fork, freshly installed.

The checkout holds only the files the fork overlays on upstream equinox (see
`hatch_build.py`), so the tests exercise the installed wheel. If that wheel is missing,
is stock upstream, or predates an edit to an overlay file, the tests would silently
check the wrong code; this guard stops the session instead.
"""

import importlib.metadata
import importlib.util
from pathlib import Path


FIX = "reinstall with `pip install --no-deps .` from the checkout"


def overlay_files(checkout: Path) -> list[Path]:
    """The overlay files in `checkout`, relative to its `equinox/` folder."""
    root = checkout / "equinox"
    return sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def stale_install_reason(
    checkout: Path, installed: Path | None, version: str | None
) -> str | None:
    """Returns one line saying why the installed equinox is not this checkout's fork,
    or `None` if it is.

    **Arguments:**

    - `checkout`: the repository root.
    - `installed`: the folder of the `equinox` package that Python imports, or `None`
        if it is not installed (or only the checkout's own folder, which has no
        `__init__.py`, is found).
    - `version`: the installed distribution's version, if any.
    """
    checkout = checkout.resolve()
    if installed is None:
        return f"equinox is not installed: {FIX}."
    installed = installed.resolve()
    if installed == checkout / "equinox":
        return (
            f"equinox is imported from the checkout ({installed}), which shadows the "
            f"installed wheel: remove any equinox/__init__.py there and {FIX}."
        )
    for relative in overlay_files(checkout):
        ours = (checkout / "equinox" / relative).read_bytes()
        theirs = installed / relative
        if theirs.is_file() and theirs.read_bytes() == ours:
            continue
        if version is None or "+" not in version:
            return (
                f"stock equinox {version} is installed, not this fork "
                f"(equinox/{relative.as_posix()} differs): {FIX}."
            )
        return (
            f"the installed equinox {version} is stale: equinox/{relative.as_posix()} "
            f"differs from the checkout's: {FIX}."
        )
    return None


def locate_installed() -> tuple[Path | None, str | None]:
    """Where Python would import `equinox` from (without importing it), and the
    version of the installed distribution."""
    spec = importlib.util.find_spec("equinox")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None, None
    try:
        version = importlib.metadata.version("equinox")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return Path(spec.origin).parent, version
