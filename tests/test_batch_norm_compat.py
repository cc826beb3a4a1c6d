"""Compatibility of `eqx.nn.BatchNorm` with Equinox 0.13.8: what a 0.13.8 user did keeps
working and keeps its meaning.

Checkpoints and outputs in `data/` were written by STOCK equinox 0.13.8
(`data/make_0_13_8_checkpoints.py` says how): every `mode` (`"ema"`, `"batch"`, unset),
every `dtype` (float32, float16, bfloat16) and momentum 0.5, 0.9, 0.99, each trained
for `STEPS` steps, plus one more step. Expected values are those stock outputs, or
float64 NumPy (`batch_norm_reference.py`, or formulas written out here); never the
layer itself.

The tests that feed NaN on purpose have `nan` in their names, so that `-k "not nan"`
leaves them out of a run under `JAX_DEBUG_NANS=True`; the test names and parameter ids
here avoid those letters.
"""

import functools
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .batch_norm_reference import (
    APPROACHES,
    inference_stats,
    moments,
    normalise,
    run,
    training_output,
)


DATA = Path(__file__).parent / "data"
# As in `make_0_13_8_checkpoints.py`.
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
MOMENTA = (0.5, 0.9, 0.99)
STEPS = 3
CHANNELS = 4
# Every way to build the layer: the approaches, and 0.13.8's spellings.
SPELLINGS = APPROACHES + ("mode=ema", "mode=batch", "mode=legacy", "unset")
# The stock checkpoint files: "unset" was built without `mode`; `mode="legacy"` is the
# same layer, so it loads the same files.
FILE_MODE = {
    "mode=ema": "ema",
    "mode=batch": "batch",
    "unset": "unset",
    "mode=legacy": "unset",
}
EMA_SPELLINGS = ("mode=ema", "unset", "mode=legacy")
# The name `batch_norm_reference` uses for each spelling's statistics.
REFERENCE_NAME = {
    **{approach: approach for approach in APPROACHES},
    "mode=ema": "ema",
    "mode=batch": "mode=batch",
    "mode=legacy": "ema",
    "unset": "ema",
}


@functools.cache
def stock() -> dict[str, np.ndarray]:
    """Everything stock 0.13.8 recorded, in `bn_0_13_8_compat.npz`."""
    with np.load(DATA / "bn_0_13_8_compat.npz") as data:
        return {name: data[name] for name in data.files}


def build(spelling, channels=3, **kwargs):
    """A layer and its state, built as `spelling` says. The spellings that 0.13.8
    warned about (unset, `mode="legacy"`) must still warn."""
    maker = eqx.nn.make_with_state(eqx.nn.BatchNorm)
    if spelling == "unset":
        with pytest.warns(UserWarning):
            return maker(channels, "batch", **kwargs)
    if spelling == "mode=legacy":
        with pytest.warns(UserWarning):
            return maker(channels, "batch", mode="legacy", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if spelling.startswith("mode="):
            return maker(channels, "batch", mode=spelling[5:], **kwargs)
        return maker(channels, "batch", approach=spelling, **kwargs)


def as_float64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def assert_close(actual, expected, dtype, *, ulps=4.0, amplification=1.0, rtol32=1e-5):
    """`actual` within `ulps` units of `dtype`'s precision of `expected`, relative to
    `1 + |expected|` and times `amplification` (for float32: within `rtol32` of that).
    """
    actual, expected = as_float64(actual), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    if dtype == jnp.float32:
        scale = rtol32
    else:
        scale = ulps * float(jnp.finfo(dtype).eps)
    tolerance = scale * amplification * (1 + np.abs(expected))
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error / tolerance), error.shape)
    assert np.all(error <= tolerance), (
        f"{int(np.sum(error > tolerance))} of {error.size} values differ; worst at "
        f"{worst}: {actual[worst]} vs {expected[worst]} "
        f"(tolerance {tolerance[worst]:.3g})"
    )


def amplification(name):
    """Per channel, 1 + |mean| / std of the recorded batches: how much the rounding
    of statistics held in half precision (by 0.13.8, or in the state) grows in a
    normalised output."""
    x = as_float64(stock()[f"inputs-{name}"])
    mean, var, _ = moments(np.concatenate(list(x)))
    return (1 + np.abs(mean) / np.sqrt(var))[None, :, None]


def stock_key(spelling, name, momentum):
    return f"{FILE_MODE[spelling]}-{name}-{momentum}"


def load(spelling, name):
    """The stock checkpoints of one mode and dtype (one per momentum), loaded into
    layers built the same way."""
    dtype = DTYPES[name]
    like = tuple(
        build(spelling, CHANNELS, momentum=momentum, dtype=dtype)
        for momentum in MOMENTA
    )
    path = DATA / f"bn_0_13_8_{FILE_MODE[spelling]}_{name}.eqx"
    return eqx.tree_deserialise_leaves(path, like)


def state_leaves(state):
    return [as_float64(leaf) for leaf in jax.tree_util.tree_leaves(state)]


def affine(layer):
    """The checkpoint's weight and bias, shaped to broadcast over a batch."""
    return (
        as_float64(layer.weight)[None, :, None],
        as_float64(layer.bias)[None, :, None],
    )


def decoded(h_mean, h_var, momentum, steps):
    """0.13.8's `mode="batch"` stores h = m^k (0, 1) + (1 - m^k) (mean, var), with
    (mean, var) the exactly debiased running averages: recover them, in float64."""
    decay = float(np.float32(momentum)) ** steps
    mean, var = h_mean / (1 - decay), (h_var - decay) / (1 - decay)
    return mean, np.maximum(var, 0.0)


def ulp(x, dtype):
    """The spacing of `dtype`'s values at |x| (normal numbers)."""
    x = np.maximum(np.abs(np.asarray(x, np.float64)), float(jnp.finfo(dtype).tiny))
    return float(jnp.finfo(dtype).eps) * 2.0 ** np.floor(np.log2(x))


# Checkpoints of every mode, dtype and momentum.


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("spelling", tuple(FILE_MODE))
def test_0_13_8_checkpoints_load_with_the_same_state_layout(spelling, name):
    """The state has 0.13.8's leaves, in its order, shapes and dtypes, and stock
    0.13.8's checkpoints load with no dtype or shape error."""
    for momentum, (layer, state) in zip(MOMENTA, load(spelling, name)):
        layout = [
            f"{leaf.dtype}{leaf.shape}" for leaf in jax.tree_util.tree_leaves(state)
        ]
        assert layout == list(stock()[f"layout-{FILE_MODE[spelling]}-{name}"])
        assert layer.momentum == momentum
        assert layer.weight is not None and layer.weight.dtype == DTYPES[name]
        # Not the freshly built values: the stock layer's trained ones.
        np.testing.assert_array_equal(as_float64(layer.weight), [1.0, 2.0, 0.5, 1.5])
        if spelling == "mode=batch":
            assert int(jax.tree_util.tree_leaves(state)[0]) == STEPS


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("spelling", EMA_SPELLINGS)
def test_0_13_8_ema_checkpoints_infer_and_continue_as_0_13_8(spelling, name, momentum):
    """An `"ema"` (or unset) checkpoint infers as stock 0.13.8 did, and one more
    training step gives 0.13.8's training output and its inference after it."""
    dtype = DTYPES[name]
    index = MOMENTA.index(momentum)
    layer, state = load(spelling, name)[index]
    key = stock_key(spelling, name, momentum)
    probe = jnp.asarray(stock()[f"probe-{name}"], dtype)
    batch = jnp.asarray(stock()[f"inputs-{name}"][STEPS], dtype)
    a = amplification(name)

    out, _ = run(layer, probe, state, inference=True)
    assert out.dtype == dtype
    assert_close(out, stock()[f"infer-{key}"], dtype, amplification=a)
    # And as float64 from the stored running statistics.
    _, mean, var = state_leaves(state)
    weight, bias = affine(layer)
    expected = normalise(as_float64(probe), mean, var, 1e-5) * weight + bias
    assert_close(out, expected, dtype, ulps=4)

    out, state = run(layer, batch, state)
    assert out.dtype == dtype
    assert_close(out, stock()[f"train-{key}"][STEPS], dtype, amplification=a)
    out, _ = run(layer, probe, state, inference=True)
    assert_close(out, stock()[f"infer_continued-{key}"], dtype, amplification=a)


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("name", DTYPES)
def test_0_13_8_batch_checkpoints_infer_exactly_debiased_and_continue(name, momentum):
    """A `mode="batch"` checkpoint infers with the exactly debiased running averages
    0.13.8 stored (0.13.8 itself added m^k / (1 - m^k) to the variance), and training
    continues from them: the next step adds its batch's mean and unbiased variance."""
    dtype = DTYPES[name]
    m = float(np.float32(momentum))
    index = MOMENTA.index(momentum)
    layer, state = load("mode=batch", name)[index]
    key = stock_key("mode=batch", name, momentum)
    probe = jnp.asarray(stock()[f"probe-{name}"], dtype)
    inputs = list(as_float64(stock()[f"inputs-{name}"]))
    weight, bias = affine(layer)
    a = amplification(name)
    counter, h_mean, h_var = state_leaves(state)
    assert counter == STEPS

    # Inference: the stored values, decoded in float64.
    out, _ = run(layer, probe, state, inference=True)
    assert out.dtype == dtype
    mean, var = decoded(h_mean, h_var, momentum, STEPS)
    expected = normalise(as_float64(probe), mean, var, 1e-5) * weight + bias
    assert_close(out, expected, dtype, ulps=4, rtol32=1e-4)
    if dtype == jnp.float32:
        # ... which are the debiased averages of the recorded batches' means and of
        # the biased variances that 0.13.8 computed.
        mean, var = inference_stats("ema_debiased", inputs[:STEPS], momentum)
        expected = normalise(as_float64(probe), mean, var, 1e-5) * weight + bias
        assert_close(out, expected, dtype, rtol32=1e-4)
    # Stock 0.13.8 inferred with a wrong variance.
    assert not np.allclose(stock()[f"infer-{key}"], expected, rtol=1e-2)

    # One more training step: normalised with the batch's own statistics.
    out, state = run(layer, jnp.asarray(inputs[STEPS], dtype), state)
    assert out.dtype == dtype
    batch_mean, batch_var, batch_unbiased = moments(inputs[STEPS])
    expected = normalise(inputs[STEPS], batch_mean, batch_var, 1e-5) * weight + bias
    assert_close(out, expected, dtype, ulps=4)
    assert_close(out, stock()[f"train-{key}"][STEPS], dtype, amplification=a)
    # The state keeps 0.13.8's encoding, now with the unbiased batch variance.
    new_counter, new_h_mean, new_h_var = state_leaves(state)
    assert new_counter == STEPS + 1
    for new, old, stat in (
        (new_h_mean, h_mean, batch_mean),
        (new_h_var, h_var, batch_unbiased),
    ):
        expected_h = m * old + (1 - m) * stat
        if dtype == jnp.float32:
            np.testing.assert_allclose(new, expected_h, rtol=1e-6, atol=1e-7)
        else:
            assert np.all(np.abs(new - expected_h) <= ulp(expected_h, dtype))
    out, _ = run(layer, probe, state, inference=True)
    if dtype == jnp.float32:
        # From the recorded batches: three biased variances (0.13.8's steps), then one
        # unbiased one (this layer's step).
        w = (1 - m) * m ** (STEPS - np.arange(STEPS + 1)) / (1 - m ** (STEPS + 1))
        stats = [moments(x) for x in inputs]
        mean = sum(wi * s[0] for wi, s in zip(w, stats))
        var = sum(wi * s[1] for wi, s in zip(w[:STEPS], stats))
        var = var + w[STEPS] * batch_unbiased
    else:
        mean, var = decoded(new_h_mean, new_h_var, momentum, STEPS + 1)
    expected = normalise(as_float64(probe), mean, var, 1e-5) * weight + bias
    assert_close(out, expected, dtype, ulps=4, rtol32=1e-4)


# `mode="legacy"`, the unset mode, and `bn.mode`.


@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("spelling", EMA_SPELLINGS)
def test_legacy_and_unset_mode_train_as_0_13_8(spelling, name, momentum):
    """Trained from scratch on the recorded batches, the layer built as 0.13.8 users
    built it gives 0.13.8's training outputs, state and inference outputs."""
    dtype = DTYPES[name]
    layer, state = build(spelling, CHANNELS, momentum=momentum, dtype=dtype)
    assert layer.mode == "ema" and layer.approach == "ema"
    layer = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        layer,
        (
            jnp.array([1.0, 2.0, 0.5, 1.5], dtype),
            jnp.array([0.0, 1.0, -1.0, 2.0], dtype),
        ),
    )
    key = stock_key(spelling, name, momentum)
    (_, stock_state) = load("mode=ema", name)[MOMENTA.index(momentum)]
    a = amplification(name)
    inputs = list(as_float64(stock()[f"inputs-{name}"]))
    weight = np.array([1.0, 2.0, 0.5, 1.5])[None, :, None]
    bias = np.array([0.0, 1.0, -1.0, 2.0])[None, :, None]
    for step, x in enumerate(inputs):
        out, state = run(layer, jnp.asarray(x, dtype), state)
        assert out.dtype == dtype
        assert_close(out, stock()[f"train-{key}"][step], dtype, amplification=a)
        # 0.13.8's formula, in float64 (0.13.8 itself computed in `dtype`).
        expected = training_output("ema", inputs[: step + 1], momentum, 1e-5)
        assert_close(out, expected * weight + bias, dtype, amplification=a)
        if step == STEPS - 1:
            for leaf, stock_leaf in zip(
                jax.tree_util.tree_leaves(state),
                jax.tree_util.tree_leaves(stock_state),
                strict=True,
            ):
                assert leaf.dtype == stock_leaf.dtype and leaf.shape == stock_leaf.shape
                assert_close(
                    leaf, as_float64(stock_leaf), dtype, amplification=a.ravel()
                )
            probe = jnp.asarray(stock()[f"probe-{name}"], dtype)
            out, _ = run(layer, probe, state, inference=True)
            assert_close(out, stock()[f"infer-{key}"], dtype, amplification=a)


MODE_ATTRIBUTE = [
    ("mode=ema", "ema"),
    ("mode=batch", "batch"),
    ("mode=legacy", "legacy"),
    ("unset", "unset"),
]


@pytest.mark.parametrize("spelling, stock_name", MODE_ATTRIBUTE)
def test_mode_attribute_and_warning_as_0_13_8(spelling, stock_name):
    """`bn.mode` is what 0.13.8 gave, and the layer warns exactly when 0.13.8 did
    (`build` checks that the warning comes, or that none does)."""
    assert bool(stock()[f"warned-{stock_name}"]) == (
        spelling in ("unset", "mode=legacy")
    )
    layer, _ = build(spelling)
    assert layer.mode == str(stock()[f"mode_attr-{stock_name}"])
    assert layer.approach == layer.mode


@pytest.mark.parametrize("approach", APPROACHES)
def test_mode_attribute_is_none_with_approach(approach):
    layer, _ = build(approach)
    assert layer.mode is None and layer.approach == approach


# Integer and half-precision inputs.


@pytest.mark.parametrize("integer", ("uint8", "int32"))
@pytest.mark.parametrize("spelling", tuple(FILE_MODE))
def test_integer_inputs_give_0_13_8_float32_outputs(spelling, integer):
    """0.13.8 normalised integer inputs to float32 outputs (e.g. uint8 [0, 100, 200,
    255] to [-1.42, -0.40, 0.63, 1.19]); so do the `mode=` spellings."""
    batches = stock()[f"int_inputs-{integer}"]
    probe = stock()[f"int_probe-{integer}"]
    assert batches.dtype == np.dtype(integer)
    layer, state = build(spelling, batches.shape[2])
    mode = FILE_MODE[spelling]
    for step, x in enumerate(batches):
        out, state = run(layer, x, state)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(
            out, stock()[f"int_train-{mode}-{integer}"][step], rtol=1e-5, atol=1e-5
        )
    out, _ = run(layer, probe, state, inference=True)
    assert out.dtype == jnp.float32
    if mode == "batch":
        # 0.13.8's inference was biased; this layer's is exact.
        stats = inference_stats("mode=batch", list(batches), layer.momentum)
        np.testing.assert_allclose(
            out, normalise(probe, *stats, 1e-5), rtol=1e-5, atol=1e-5
        )
    else:
        np.testing.assert_allclose(
            out, stock()[f"int_infer-{mode}-{integer}"], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("integer", ("uint8", "int32"))
@pytest.mark.parametrize("approach", APPROACHES)
def test_integer_inputs_give_float_outputs_for_every_approach(approach, integer):
    batches = stock()[f"int_inputs-{integer}"]
    layer, state = build(approach, batches.shape[2])
    out, state = run(layer, batches[0], state)
    assert jnp.issubdtype(out.dtype, jnp.floating)
    expected = training_output(approach, [batches[0]], layer.momentum, 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    out, _ = run(layer, batches[1], state, inference=True)
    assert jnp.issubdtype(out.dtype, jnp.floating)
    stats = inference_stats(approach, [batches[0]], layer.momentum)
    np.testing.assert_allclose(
        out, normalise(batches[1], *stats, 1e-5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("layer_dtype", ("default", "same"))
@pytest.mark.parametrize("name", ("float16", "bfloat16"))
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_half_precision_inputs_keep_their_dtype(spelling, name, layer_dtype):
    dtype = DTYPES[name]
    kwargs = {} if layer_dtype == "default" else dict(dtype=dtype)
    layer, state = build(spelling, **kwargs)
    rng = np.random.default_rng(5)
    batches = [jnp.asarray(rng.normal(0.5, 1.0, (8, 3, 2)), dtype) for _ in range(2)]
    out, state = run(layer, batches[0], state)
    assert out.dtype == dtype
    # The first step normalises with this batch's statistics, in every approach.
    x = as_float64(batches[0])
    assert_close(out, normalise(x, *moments(x)[:2], 1e-5), dtype, ulps=4)
    out, state = run(layer, batches[1], state)
    assert out.dtype == dtype
    out, _ = run(layer, batches[1], state, inference=True)
    assert out.dtype == dtype
    assert np.all(np.isfinite(as_float64(out)))
    if layer_dtype == "default":  # float32 running statistics
        xs = [as_float64(b) for b in batches]
        stats = inference_stats(REFERENCE_NAME[spelling], xs, layer.momentum)
        assert_close(out, normalise(xs[1], *stats, 1e-5), dtype, ulps=4)


@pytest.mark.parametrize("layer_dtype", ("default", "float16"))
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_float16_batch_summing_past_float16_max_stays_finite(spelling, layer_dtype):
    """The values sum to about 77000, past float16's largest value 65504 (their
    squares far past it): the statistics are computed in at least float32."""
    kwargs = {} if layer_dtype == "default" else dict(dtype=jnp.float16)
    layer, state = build(spelling, 2, **kwargs)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(600.0, 10.0, (128, 2, 1)), jnp.float16)
    assert float(jnp.sum(as_float64(x)[:, 0])) > 65504
    out, state = run(layer, x, state)
    assert out.dtype == jnp.float16
    assert np.all(np.isfinite(as_float64(out)))
    x64 = as_float64(x)
    assert_close(out, normalise(x64, *moments(x64)[:2], 1e-5), jnp.float16, ulps=4)
    out, _ = run(layer, x, state, inference=True)
    assert out.dtype == jnp.float16
    assert np.all(np.isfinite(as_float64(out)))
    if layer_dtype == "default":
        stats = inference_stats(REFERENCE_NAME[spelling], [x64], layer.momentum)
        assert_close(out, normalise(x64, *stats, 1e-5), jnp.float16, ulps=4)


# JAX's debug flags: nothing NaN (or inf) is computed anywhere.


@pytest.fixture(params=("jax_debug_nans", "jax_debug_infs"), ids=("invalid", "inf"))
def debug_flag(request):
    previous = getattr(jax.config, request.param)
    jax.config.update(request.param, True)
    try:
        yield request.param
    finally:
        jax.config.update(request.param, previous)


def loss_and_grads(layer, x, state, inference, jit):
    """A loss of the output and of the new state's floating leaves, and its gradients
    with respect to the parameters, the input and the state's floating leaves."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    floats, rest = eqx.partition(state, eqx.is_inexact_array)
    weights = jnp.linspace(-1.0, 2.0, x.size).reshape(x.shape)

    def loss(params, x, floats):
        layer = eqx.combine(params, static)
        out, new_state = run(layer, x, eqx.combine(floats, rest), inference=inference)
        total = jnp.sum(out * weights)
        for leaf in jax.tree_util.tree_leaves(
            eqx.filter(new_state, eqx.is_inexact_array)
        ):
            total = total + jnp.sum(jnp.cos(leaf))
        return total, new_state

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    if jit:
        grad = eqx.filter_jit(grad)
    (value, new_state), grads = grad(params, jnp.asarray(x), floats)
    assert np.isfinite(float(value))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    return new_state


@pytest.mark.parametrize("jit", (False, True), ids=("eager", "jit"))
@pytest.mark.parametrize("spelling", APPROACHES + ("mode=ema", "mode=batch"))
def test_debug_flags_find_nothing_in_training_inference_and_gradients(
    spelling, jit, debug_flag
):
    """With `jax_debug_nans` (or `jax_debug_infs`) on, eagerly (every operation is
    checked, including branches that `jnp.where` discards) and under `jit` (only the
    outputs are): inference before training, training steps, inference after, and
    their gradients with respect to the parameters, the input and the state."""
    del debug_flag
    layer, state = build(spelling)
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (8, 3, 2)).astype(np.float32)
    probe = rng.normal(1.0, 2.0, (5, 3, 2)).astype(np.float32)
    step = eqx.filter_jit(run) if jit else run
    for inference in (True, False):  # at the initial state
        loss_and_grads(layer, x, state, inference, jit)
    out, _ = step(layer, probe, state, inference=True)
    for _ in range(3):
        out, state = step(layer, x + _, state)
        assert np.all(np.isfinite(np.asarray(out)))
    out, _ = step(layer, probe, state, inference=True)
    assert np.all(np.isfinite(np.asarray(out)))
    for inference in (True, False):  # after training
        loss_and_grads(layer, x, state, inference, jit)
