"""Writes the BatchNorm checkpoints that `test_batch_norm.py` loads. Run it with stock
`equinox==0.13.8` installed (not this fork): `python make_0_13_8_checkpoints.py`.

For each `mode`, a `BatchNorm(4, "batch", mode=mode, momentum=0.9)` is trained for three
steps on fixed inputs, and `(model, state)` is saved with `eqx.tree_serialise_leaves`,
with the stock layer's inference output on a fixed probe input beside it.
"""

from pathlib import Path

import equinox as eqx
import jax
import numpy as np


assert eqx.__version__ == "0.13.8", eqx.__version__
here = Path(__file__).parent
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
    train = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for x in inputs:
        _, state = train(x, state)
    eqx.tree_serialise_leaves(here / f"bn_0_13_8_{mode}.eqx", (model, state))
    infer = jax.vmap(
        eqx.nn.inference_mode(model),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    out, _ = infer(probe, state)
    np.save(here / f"bn_0_13_8_{mode}_inference.npy", np.asarray(out))
