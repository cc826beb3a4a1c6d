"""Tests of the stale-install guard that starts every test session (`conftest.py`)."""

import subprocess
import sys
from pathlib import Path

import pytest
from stale_guard import locate_installed, stale_install_reason


CHECKOUT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "equinox" / "nn").mkdir(parents=True)
    (root / "equinox" / "nn" / "_batch_norm.py").write_text("fork = True\n")
    return root


def _install(tmp_path: Path, text: str) -> Path:
    package = tmp_path / "site-packages" / "equinox"
    (package / "nn").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nn" / "_batch_norm.py").write_text(text)
    return package


def test_fresh_install_passes(checkout, tmp_path):
    installed = _install(tmp_path, "fork = True\n")
    assert stale_install_reason(checkout, installed, "0.13.8+batchnorm.1") is None


def test_missing_install_is_reported(checkout):
    reason = stale_install_reason(checkout, None, None)
    assert reason is not None
    assert "not installed" in reason and "pip install --no-deps ." in reason


def test_stock_upstream_is_reported(checkout, tmp_path):
    installed = _install(tmp_path, "upstream = True\n")
    reason = stale_install_reason(checkout, installed, "0.13.8")
    assert reason is not None
    assert "stock equinox 0.13.8" in reason and "pip install --no-deps ." in reason


@pytest.mark.parametrize("name", ["_batch_norm.py", "_extra.py"], ids=["edited", "new"])
def test_overlay_change_without_reinstall_is_reported(checkout, tmp_path, name):
    installed = _install(tmp_path, "fork = True\n")
    (checkout / "equinox" / "nn" / name).write_text("fork = 2\n")
    reason = stale_install_reason(checkout, installed, "0.13.8+batchnorm.1")
    assert reason is not None
    assert "stale" in reason and f"equinox/nn/{name}" in reason


def test_virtual_environment_inside_the_checkout_passes(checkout):
    """`.venv/` inside the checkout (as the README's commands make it) is fine."""
    site = checkout / ".venv" / "lib" / "site-packages" / "equinox"
    (site / "nn").mkdir(parents=True)
    (site / "nn" / "_batch_norm.py").write_text("fork = True\n")
    assert stale_install_reason(checkout, site, "0.13.8+batchnorm.1") is None


def test_checkout_shadowing_the_install_is_reported(checkout):
    reason = stale_install_reason(checkout, checkout / "equinox", "0.13.8+batchnorm.1")
    assert reason is not None and "shadows" in reason


def test_this_session_imports_the_fresh_fork():
    """The real check, as `conftest.py` runs it, passes for the running session."""
    assert stale_install_reason(CHECKOUT, *locate_installed()) is None


def test_guard_stops_pytest_with_one_line(tmp_path):
    """End to end: pytest run in a checkout whose overlay differs from the installed
    equinox stops before collecting, printing the reason."""
    root = tmp_path / "repo"
    (root / "fork").mkdir(parents=True)
    (root / "equinox" / "nn").mkdir(parents=True)
    (root / "tests").mkdir()
    for name in ("conftest.py", "fork/stale_guard.py"):
        (root / name).write_text((CHECKOUT / name).read_text())
    (root / "equinox" / "nn" / "_batch_norm.py").write_text("edited = True\n")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "tests" / "test_nothing.py").write_text("def test_x():\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Stale install:" in result.stdout + result.stderr
    assert "equinox/nn/_batch_norm.py" in result.stdout + result.stderr
