# Fork-only test machinery: stop at once if the installed equinox is not this
# checkout's fork. `scripts/export-to-upstream` does not export this file.
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).parent / "fork"))
from stale_guard import locate_installed, stale_install_reason  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    reason = stale_install_reason(Path(__file__).parent, *locate_installed())
    if reason is not None:
        pytest.exit(f"Stale install: {reason}", returncode=4)
