"""Writes the Equinox 0.13.8 checkpoints and outputs that the BatchNorm tests compare
against. It must run with STOCK `equinox==0.13.8` from PyPI (whose layer has no
`approach=`):

    python3 -m venv /tmp/stock
    /tmp/stock/bin/pip install equinox==0.13.8 jax==0.10.2 numpy
    /tmp/stock/bin/python tests/data/make_0_13_8_checkpoints.py

It refuses to run on anything but the stock layer. Running it again rewrites the same
files. It writes, into this folder:

1. For `test_batch_norm.py` (the first, float32-only set): for each `mode`, a
   `BatchNorm(4, "batch", mode=mode, momentum=0.9)` trained for three steps on fixed
   inputs, saved with `eqx.tree_serialise_leaves` as `bn_0_13_8_{mode}.eqx`, with the
   inputs (`bn_0_13_8_inputs.npy`), a probe (`bn_0_13_8_probe.npy`) and the stock
   layer's inference output on the probe (`bn_0_13_8_{mode}_inference.npy`).

2. For `test_batch_norm_compat.py`: every way of building the layer that 0.13.8 had
   (`mode="ema"`, `mode="batch"`, and `mode` unset, which is "ema" plus a warning),
   every `dtype` (float32, float16, bfloat16) and momentum 0.5, 0.9 and 0.99. Each
   `BatchNorm(4, "batch", mode=..., momentum=..., dtype=...)` has a non-trivial affine
   part, is trained for `STEPS` steps on inputs of its dtype, and is saved; then one
   more training step is taken, to record how 0.13.8 continues.
   - `bn_0_13_8_{mode}_{dtype}.eqx`: a tuple over `MOMENTA` of `(model, state)`
     after `STEPS` steps.
   - `bn_0_13_8_compat.npz`: the inputs (as float32 arrays holding exactly the values
     the stock layer saw in its dtype), and per configuration the training outputs of
     all `STEPS + 1` steps and the inference outputs on the probe after `STEPS` and
     `STEPS + 1` steps (float32 holding the stock outputs exactly), the stock state's
     leaf layout, `bn.mode`, and whether building the layer warned. Also 0.13.8's
     outputs for integer inputs (uint8 and int32), with default momentum and dtype.
"""

import warnings
import zipfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


assert eqx.__version__ == "0.13.8", eqx.__version__
assert "approach" not in eqx.nn.BatchNorm.__init__.__code__.co_varnames, (
    "run this with stock equinox==0.13.8 from PyPI"
)
here = Path(__file__).parent


def train_step(model, x, state):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return batched(jnp.asarray(x), state)


def infer(model, x, state):
    return train_step(eqx.nn.inference_mode(model), x, state)[0]


# 1. The first set (float32, momentum 0.9), unchanged.
rng = np.random.default_rng(0)
inputs = [rng.normal(2.0, 3.0, (8, 4, 5)).astype(np.float32) for _ in range(3)]
probe = rng.normal(1.0, 2.0, (6, 4, 5)).astype(np.float32)
np.save(here / "bn_0_13_8_inputs.npy", np.stack(inputs))
np.save(here / "bn_0_13_8_probe.npy", probe)
for mode in ("ema", "batch"):
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        4, "batch", mode=mode, momentum=0.9
    )
    model = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        model,
        (
            np.array([1.0, 2.0, 0.5, 1.5], np.float32),
            np.array([0.0, 1.0, -1.0, 2.0], np.float32),
        ),
    )
    for x in inputs:
        _, state = train_step(model, x, state)
    eqx.tree_serialise_leaves(here / f"bn_0_13_8_{mode}.eqx", (model, state))
    np.save(
        here / f"bn_0_13_8_{mode}_inference.npy", np.asarray(infer(model, probe, state))
    )


# 2. Every mode, dtype and momentum.
MODES = ("ema", "batch", "unset")
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
MOMENTA = (0.5, 0.9, 0.99)
STEPS = 3
CHANNELS = 4
# Per channel: different locations and scales, one far from zero relative to its spread.
LOC = np.array([2.0, -1.0, 0.5, 10.0])[None, :, None]
SCALE = np.array([3.0, 0.5, 1.0, 2.0])[None, :, None]
WEIGHT = np.array([1.0, 2.0, 0.5, 1.5])
BIAS = np.array([0.0, 1.0, -1.0, 2.0])

rng = np.random.default_rng(13_8)
raw_batches = [
    LOC + SCALE * rng.normal(size=(8, CHANNELS, 3)) for _ in range(STEPS + 1)
]
raw_probe = LOC + 2 * SCALE * rng.normal(size=(4, CHANNELS, 3))

data = {}


def as_recorded(x):
    """A float32 NumPy copy of a JAX array (exact for float16 and bfloat16)."""
    return np.asarray(jnp.asarray(x, jnp.float32))


def build(mode, **kwargs):
    """A stock layer built with `mode` (or without it), and whether it warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "unset":
            made = eqx.nn.make_with_state(eqx.nn.BatchNorm)(**kwargs)
        else:
            made = eqx.nn.make_with_state(eqx.nn.BatchNorm)(mode=mode, **kwargs)
    return made, len(caught) > 0


for name, dtype in DTYPES.items():
    batches = [jnp.asarray(b, dtype) for b in raw_batches]
    probe = jnp.asarray(raw_probe, dtype)
    data[f"inputs-{name}"] = np.stack([as_recorded(b) for b in batches])
    data[f"probe-{name}"] = as_recorded(probe)
    for mode in MODES:
        checkpoints = []
        for momentum in MOMENTA:
            (model, state), warned = build(
                mode,
                input_size=CHANNELS,
                axis_name="batch",
                momentum=momentum,
                dtype=dtype,
            )
            model = eqx.tree_at(
                lambda m: (m.weight, m.bias),
                model,
                (jnp.asarray(WEIGHT, dtype), jnp.asarray(BIAS, dtype)),
            )
            key = f"{mode}-{name}-{momentum}"
            outputs = []
            for x in batches[:STEPS]:
                out, state = train_step(model, x, state)
                assert out.dtype == dtype
                outputs.append(as_recorded(out))
            checkpoints.append((model, state))
            data[f"infer-{key}"] = as_recorded(infer(model, probe, state))
            out, state_after = train_step(model, batches[STEPS], state)
            outputs.append(as_recorded(out))
            data[f"train-{key}"] = np.stack(outputs)
            data[f"infer_continued-{key}"] = as_recorded(
                infer(model, probe, state_after)
            )
            data[f"layout-{mode}-{name}"] = np.array(
                [
                    f"{leaf.dtype}{leaf.shape}"
                    for leaf in jax.tree_util.tree_leaves(state)
                ]
            )
            data[f"mode_attr-{mode}"] = np.array(model.mode)
            data[f"warned-{mode}"] = np.array(warned)
        eqx.tree_serialise_leaves(
            here / f"bn_0_13_8_{mode}_{name}.eqx", tuple(checkpoints)
        )

# `mode="legacy"` is 0.13.8's default value of `mode`; passing it is the same as unset.
(legacy, _), warned = build("legacy", input_size=CHANNELS, axis_name="batch")
data["mode_attr-legacy"] = np.array(legacy.mode)
data["warned-legacy"] = np.array(warned)

# Integer inputs: 0.13.8 normalises them to float32.
integer_inputs = {
    "uint8": (
        np.array([[[0], [100], [200], [255]], [[3], [50], [90], [240]]], np.uint8),
        np.array([[0], [128], [255]], np.uint8),
    ),
    "int32": (
        rng.integers(-1000, 1000, (2, 6, 2, 3)).astype(np.int32),
        rng.integers(-1500, 1500, (3, 2, 3)).astype(np.int32),
    ),
}
for name, (batches, probe) in integer_inputs.items():
    data[f"int_inputs-{name}"] = batches
    data[f"int_probe-{name}"] = probe
    for mode in MODES:
        (model, state), _ = build(mode, input_size=batches.shape[2], axis_name="batch")
        outputs = []
        for x in batches:
            out, state = train_step(model, x, state)
            assert out.dtype == jnp.float32
            outputs.append(np.asarray(out))
        data[f"int_train-{mode}-{name}"] = np.stack(outputs)
        data[f"int_infer-{mode}-{name}"] = np.asarray(infer(model, probe, state))

# As `np.savez_compressed`, but with fixed timestamps, so that the file is the same
# bytes every time.
with zipfile.ZipFile(here / "bn_0_13_8_compat.npz", "w", zipfile.ZIP_DEFLATED) as npz:
    for name, array in data.items():
        info = zipfile.ZipInfo(f"{name}.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with npz.open(info, "w") as member:
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
