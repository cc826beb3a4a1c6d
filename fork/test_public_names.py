"""The build hook adds this patch's public names to upstream's packages by editing their
`__init__.py` in the staged tree (`PUBLIC_NAMES` in `hatch_build.py`), and records each
edit in the wheel's `equinox_overlay.json`."""

import hashlib
import importlib.metadata
import json
from pathlib import Path

import equinox as eqx
from equinox.nn._batch_norm import recompute_batch_norm_statistics


def test_recompute_batch_norm_statistics_is_public_in_eqx_nn():
    assert eqx.nn.recompute_batch_norm_statistics is recompute_batch_norm_statistics


def test_the_wheel_records_the_edited_init_file():
    record = importlib.metadata.distribution("equinox").read_text(
        "extra_metadata/equinox_overlay.json"
    )
    assert record is not None
    edited = json.loads(record)["edited"]["equinox/nn/__init__.py"]
    installed = Path(eqx.__file__).parent / "nn" / "__init__.py"
    assert edited["with"] in installed.read_text(encoding="utf-8")
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == edited["sha256"]
