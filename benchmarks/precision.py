"""How exactly each BatchNorm computes the batch variance, against float64.

    python benchmarks/precision.py                 # ~1 minute on 2 CPU cores
    python benchmarks/precision.py --out benchmarks/results/precision.md

Inputs: `(N, C, H, W) = (256, 16, 4, 4)`, 4096 values per channel, drawn as
`mean + std * normal` with `|mean| / std` in {1, 1e2, 1e3, 1e4, 1e5}, in float32 and in
bfloat16. The reference is the float64 variance of the values the layer actually
receives (after rounding to the input dtype), so the table shows the error of the
algorithm, not of the input's rounding. Each cell is the largest relative error
`|var - reference| / reference` over the 16 channels.

"First step": a fresh layer's first training step. "Later step": the second step, on
a new batch from the same distribution, so that a layer that keeps running averages
has a running mean close to the batch mean (within a few std / sqrt(N)).

How the variance is read, per row:
- from the state: `eqx.nn.BatchNorm(approach="batch")` stores the exactly debiased
  running average of the unbiased variance, which after the first step *is* that
  step's unbiased variance; at momentum 1e-6 the second step's is
  `v2 + m / (1 + m) * (v1 - v2)`, and the reference is that formula in float64 with
  `v2` exact and `v1` the stored value (so that a later step is charged only with its
  own error). Flax (momentum 0) and Haiku (decay 0) store the current batch's biased
  variance.
- from the output (`jax.nn.standardize`, which keeps no state, and this layer as a
  check): the variance the output was normalised with, `1 / s^2`, where `s` is the
  float64 least-squares slope of the output on the input within a channel (`eps = 0`
  everywhere). Its resolution is set by the output's rounding: below 1e-6 for float32
  outputs, about 1e-3 for bfloat16 ones (compare the two rows of this layer).

"0 (collapsed)": a variance of exactly 0 (a relative error of 1, the output is
`(x - mean) / sqrt(eps)`); "< 0": negative (Haiku does not clip it, so the output is
NaN); "—": after rounding to bfloat16 every value of a channel is equal (the input has
no variance left to measure).
"""

import argparse
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import layers
import numpy as np
from markdown_table import markdown_table


RATIOS = (1, 1e2, 1e3, 1e4, 1e5)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SHAPE = (256, 16, 4, 4)
AXES = (0, 2, 3)
MOMENTUM = 1e-6  # this layer's (it must lie in (0, 1)); Flax's and Haiku's are 0
# |batch mean - running mean| / std for the table of this layer's shifted sums.
DISTANCES = (0, 1, 2, 3.9, 4.1, 10, 1e3)


SIGNS = np.resize([1.0, -1.0], SHAPE[1])  # of each channel's mean


def batch(key, ratio, dtype, offset=0.0):
    """One batch: per channel, mean `±(ratio + offset)` (in units of std), std 1."""
    z = np.asarray(jax.random.normal(key, SHAPE, jnp.float32), np.float64)
    x = z + ((ratio + offset) * SIGNS)[None, :, None, None]
    return jnp.asarray(x, dtype)


def reference(x) -> tuple[np.ndarray, np.ndarray]:
    """float64 (biased, unbiased) variance per channel of the values in `x`."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    biased = x64.var(axis=AXES)
    n = x64.size // x64.shape[1]
    return biased, biased * n / (n - 1)


def from_output(x, out) -> np.ndarray:
    """The variance `out` was normalised with: 1 / slope^2 of out on x, per channel."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    y64 = np.asarray(out.astype(jnp.float32), np.float64)
    xc = x64 - x64.mean(axis=AXES, keepdims=True)
    yc = y64 - y64.mean(axis=AXES, keepdims=True)
    slope = (xc * yc).sum(axis=AXES) / (xc * xc).sum(axis=AXES)
    with np.errstate(divide="ignore"):
        return 1 / slope**2


def standardize(x, algorithm) -> layers.Layer:
    def train(params, state, x):
        # (A dict: pyright does not see the keywords through the `jit` wrapper.)
        options: dict[str, Any] = {"epsilon": 0, "algorithm": algorithm}
        out = jax.nn.standardize(x, axis=AXES, **options)
        return out, state

    return layers.Layer(None, None, train, train)


# name -> (builder(x) -> Layer, how the variance is read: "state" or "output",
# whether the stored variance is unbiased)
ROWS = {
    'eqx.nn.BatchNorm(approach="batch"), state': (
        lambda x: layers.equinox(x, "batch", MOMENTUM, eps=0),
        "state",
    ),
    'eqx.nn.BatchNorm(approach="batch"), output': (
        lambda x: layers.equinox(x, "batch", MOMENTUM, eps=0),
        "output",
    ),
    "Flax, fast variance (default)": (
        lambda x: layers.flax(x, True, 0.0, eps=0),
        "state",
    ),
    "Flax, two-pass variance": (lambda x: layers.flax(x, False, 0.0, eps=0), "state"),
    "Haiku": (lambda x: layers.haiku(x, 0.0, eps=0), "state"),
    'jax.nn.standardize (default, "fast")': (
        lambda x: standardize(x, "fast"),
        "output",
    ),
    'jax.nn.standardize(algorithm="stable")': (
        lambda x: standardize(x, "stable"),
        "output",
    ),
}


def errors(name, x1, x2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(measured, float64 truth) per channel, on the first step (on x1) and the next
    (on x2)."""
    build, how = ROWS[name]
    layer = build(x1)
    train = jax.jit(layer.train)
    unbiased_state = name.startswith("eqx")
    out = []
    state, previous = layer.state, None
    for x in (x1, x2):
        y, state = train(layer.params, state, x)
        biased, unbiased = reference(x)
        if how == "output":
            measured, truth = from_output(x, y), biased
        else:
            assert layer.running_var is not None
            measured = np.asarray(layer.running_var(state).astype(jnp.float32))
            measured = measured.astype(np.float64)
            truth = unbiased if unbiased_state else biased
            if unbiased_state and previous is not None:
                # The exactly debiased average of this step's and the stored one.
                truth = truth + MOMENTUM / (1 + MOMENTUM) * (previous - truth)
            previous = measured
        out.append((measured, truth))
    return out


def cell(result: tuple[np.ndarray, np.ndarray]) -> str:
    """The largest relative error over the channels whose input has a variance."""
    measured, truth = (a[result[1] > 0] for a in result)
    if len(truth) == 0:
        return "—"
    if not np.all(np.isfinite(measured)):
        return "not finite"
    if np.any(measured < 0):
        return "< 0"
    if np.any(measured == 0):
        return "0 (collapsed)"
    worst = float(np.max(np.abs(measured - truth) / truth))
    return "0" if worst == 0 else f"{worst:.0e}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=str, help="also write the markdown here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parts = [
        "# BatchNorm variance precision\n",
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, equinox {eqx.__version__}. Largest relative error of "
        f"the batch variance over {SHAPE[1]} channels of "
        f"{SHAPE[0] * SHAPE[2] * SHAPE[3]} values each, against float64; how each row "
        "is measured: "
        "`benchmarks/precision.py`.\n",
    ]
    key = jax.random.PRNGKey(0)
    for dtype_name, dtype in DTYPES.items():
        header = ["|mean| / std"]
        for ratio in RATIOS:
            header += [f"{ratio:.0e} first", f"{ratio:.0e} later"]
        rows = {name: [name] for name in ROWS}
        for ratio in RATIOS:
            k1, k2 = jax.random.split(jax.random.fold_in(key, int(np.log10(ratio))))
            x1, x2 = batch(k1, ratio, dtype), batch(k2, ratio, dtype)
            for name in ROWS:
                rows[name] += [cell(e) for e in errors(name, x1, x2)]
        parts.append(f"## {dtype_name} inputs\n")
        parts.append(markdown_table(header, list(rows.values())) + "\n")

    # This layer's one-pass sums are shifted by the running mean K: exact while the
    # batch mean is within 4 std of K, and redone around the batch mean beyond.
    name = 'eqx.nn.BatchNorm(approach="batch"), state'
    header = ["|batch mean − K| / std"] + [f"|mean| / std = {r:.0e}" for r in RATIOS]
    rows = []
    for distance in DISTANCES:
        row = [f"{distance:g}"]
        for ratio in RATIOS:
            k1, k2 = jax.random.split(jax.random.fold_in(key, 100 + int(distance)))
            x1 = batch(k1, ratio, jnp.float32)
            x2 = batch(k2, ratio, jnp.float32, offset=distance)
            row.append(cell(errors(name, x1, x2)[1]))
        rows.append(row)
    parts.append(
        "## This layer's shifted one-pass sums, float32\n\nA later step whose batch "
        "mean lies `d` std from the running mean `K` (the first batch's mean), so "
        "the sums are shifted by K; beyond 4 std the layer redoes them around the "
        f"batch mean. {name}.\n"
    )
    parts.append(markdown_table(header, rows) + "\n")
    parts.append(f"Total time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
