"""Build hook: a complete `equinox` wheel = the pinned upstream wheel + this overlay.

The wheel target stages one tree (upstream's `equinox/` package, then every file under
this repository's `equinox/` copied over it) and force-includes only that tree. The
upstream wheel comes from `pip download` (so pip's own configuration and indexes
apply) or, for offline builds, from the path in `$EQUINOX_UPSTREAM`. Its sha256 and
its runtime dependencies are checked against the pins below. A public name the overlay
adds to an upstream package is added by editing that package's `__init__.py` in the
staged tree (`PUBLIC_NAMES`); no copy of an upstream `__init__.py` lives here.
"""

import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


UPSTREAM_VERSION = "0.13.8"
UPSTREAM_WHEEL = f"equinox-{UPSTREAM_VERSION}-py3-none-any.whl"
UPSTREAM_SHA256 = "ca004348533cc30a63ebe8823d7dd4bb626dce17743d40bbddb89b402ef2a240"
UPSTREAM_ENV = "EQUINOX_UPSTREAM"
OVERLAY_RECORD = "equinox_overlay.json"
# Public names the overlay adds: per upstream file, the line it has in 0.13.8 and the
# text that replaces that line. `scripts/export-to-upstream` reads this table (with
# `ast`, without importing this file) to make the same edit in an upstream checkout.
PUBLIC_NAMES = {
    "equinox/nn/__init__.py": (
        "from ._batch_norm import BatchNorm as BatchNorm\n",
        "from ._batch_norm import (\n"
        "    BatchNorm as BatchNorm,\n"
        "    recompute_batch_norm_statistics as recompute_batch_norm_statistics,\n"
        ")\n",
    ),
}


class OverlayBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        if version == "editable":
            raise RuntimeError(
                "This fork cannot be installed in editable mode: its wheel is upstream "
                "equinox with this checkout's files overlaid, which an editable "
                "install cannot express. Run `pip install --no-deps .` instead (again "
                "after each edit)."
            )
        self._tmp = tmp = Path(tempfile.mkdtemp(prefix="equinox-overlay-"))
        try:
            wheel = self._upstream_wheel(tmp)
            self._check_dependencies(wheel)
            stage = tmp / "stage"
            self._stage(wheel, stage)
        except BaseException:
            self._cleanup()
            raise
        build_data["force_include"][str(stage / "equinox")] = "equinox"
        dist_info = f"{self.metadata.core.name}-{self.metadata.version}.dist-info"
        build_data["force_include"][str(stage / "LICENSE")] = (
            f"{dist_info}/licenses/upstream/LICENSE"
        )
        build_data["extra_metadata"][str(stage / OVERLAY_RECORD)] = OVERLAY_RECORD

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self._tmp = None

    def _upstream_wheel(self, tmp: Path) -> Path:
        local = os.environ.get(UPSTREAM_ENV)
        if local:
            wheel = Path(local).expanduser().resolve()
            if not wheel.is_file():
                raise RuntimeError(f"${UPSTREAM_ENV}={local} is not a file.")
        else:
            download = tmp / "download"
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(download),
                f"equinox=={UPSTREAM_VERSION}",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            wheel = download / UPSTREAM_WHEEL
            if result.returncode != 0 or not wheel.is_file():
                raise RuntimeError(
                    f"Could not download the upstream wheel {UPSTREAM_WHEEL} with "
                    f"`{' '.join(command)}`. For an offline build, set "
                    f"${UPSTREAM_ENV} to the path of that wheel.\n{result.stderr}"
                )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != UPSTREAM_SHA256:
            raise RuntimeError(
                f"{wheel} has sha256 {digest}, but the pinned upstream wheel "
                f"{UPSTREAM_WHEEL} has sha256 {UPSTREAM_SHA256}."
            )
        return wheel

    def _check_dependencies(self, wheel: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(
                f"equinox-{UPSTREAM_VERSION}.dist-info/METADATA"
            ).decode()
        upstream = email.parser.Parser().parsestr(metadata).get_all("Requires-Dist")
        ours = self.metadata.core.dependencies
        if _normalise(upstream or []) != _normalise(ours):
            raise RuntimeError(
                "pyproject.toml's dependencies differ from the pinned upstream wheel's "
                f"Requires-Dist.\n  upstream: {sorted(upstream or [])}\n"
                f"  ours:     {sorted(ours)}"
            )

    def _stage(self, wheel: Path, stage: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("equinox/"):
                    archive.extract(name, stage)
            license_name = f"equinox-{UPSTREAM_VERSION}.dist-info/licenses/LICENSE"
            (stage / "LICENSE").write_bytes(archive.read(license_name))
        root = Path(self.root)
        overlay = sorted(
            path
            for path in (root / "equinox").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        )
        if (root / "equinox" / "__init__.py").exists():
            raise RuntimeError(
                "equinox/__init__.py must not exist in the checkout: it would shadow "
                "the installed package. The overlay holds only the files it replaces."
            )
        record = {}
        for path in overlay:
            relative = path.relative_to(root).as_posix()
            target = stage / relative
            record[relative] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "replaces_upstream": target.exists(),
            }
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        edited = {}
        for relative, (line, replacement) in PUBLIC_NAMES.items():
            if relative in record:
                raise RuntimeError(
                    f"{relative} is both overlaid and edited by PUBLIC_NAMES: "
                    "make the edit in the overlay file instead."
                )
            target = stage / relative
            before = target.read_text(encoding="utf-8")
            target.write_text(replace_line(before, line, replacement), encoding="utf-8")
            edited[relative] = {
                "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                "upstream_sha256": hashlib.sha256(before.encode()).hexdigest(),
                "replaced": line,
                "with": replacement,
            }
        (stage / OVERLAY_RECORD).write_text(
            json.dumps(
                {
                    "upstream": UPSTREAM_WHEEL,
                    "upstream_sha256": UPSTREAM_SHA256,
                    "overlaid": record,
                    "edited": edited,
                },
                indent=2,
            )
            + "\n"
        )


def replace_line(text: str, line: str, replacement: str) -> str:
    """Replaces the whole line `line` (ending in a newline) of `text` with
    `replacement`; fails loudly unless `text` has that line exactly once."""
    found = len(re.findall(f"^{re.escape(line)}", text, re.M))
    if found != 1:
        raise RuntimeError(
            f"Expected the line {line.strip()!r} once in upstream's file, found it "
            f"{found} times: update PUBLIC_NAMES in hatch_build.py."
        )
    return re.sub(f"^{re.escape(line)}", lambda _: replacement, text, flags=re.M)


def _normalise(requirements: list[str]) -> set[tuple[str, ...]]:
    parsed = (Requirement(text) for text in requirements)
    return {
        (canonicalize_name(r.name), str(r.specifier), str(r.marker or ""), *r.extras)
        for r in parsed
    }
