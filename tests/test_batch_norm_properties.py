"""Property-based tests of `eqx.nn.BatchNorm(approach=...)`.

Each test states one property in its docstring and checks it on examples drawn by
hypothesis against an independent computation: the float64 NumPy closed forms of
`batch_norm_reference.py`, or plain `jax.numpy`.

Hypothesis profiles, both deterministic: `quick` (the default) and `thorough` (more
examples), chosen with the environment variable `BATCHNORM_HYPOTHESIS_PROFILE`.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, HealthCheck, settings, strategies as st

from .batch_norm_reference import (
    APPROACHES,
    batch_norm,
    DEBIASED,
    EPS32,
    inference_stats,
    make,
    moments,
    normalise,
    pooled_statistics,
    run,
    tolerance,
    training_output,
    UNBIASED,
)


for name, examples in (("quick", 12), ("thorough", 50)):
    settings.register_profile(
        name,
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
settings.load_profile(os.environ.get("BATCHNORM_HYPOTHESIS_PROFILE", "quick"))

# Every approach, and `mode="batch"` (0.13's encoding of the state).
LAYOUTS = APPROACHES + ("mode=batch",)
# A few shapes `(batch, channels, *spatial)`, so that compiled code is reused.
SHAPES = ((2, 1), (5, 3), (3, 2, 3), (2, 3, 2, 2))

momenta = st.one_of(
    st.sampled_from((0.1, 0.5, 0.9, 0.99, 0.999)), st.floats(0.01, 0.999)
)


@st.composite
def batches(draw, count=1, shapes=SHAPES, min_batch=2):
    """`count` float32 batches of one shape, with per-channel offsets and scales, so
    that the statistics differ across channels and batches."""
    shape = draw(st.sampled_from(shapes))
    shape = (max(shape[0], min_batch),) + shape[1:]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc, scale = draw(st.floats(-5, 5)), draw(st.floats(0.2, 5))
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    return [
        (
            rng.normal(loc, 1.0, channel)
            + scale * rng.uniform(0.5, 2.0, channel) * rng.normal(size=shape)
        ).astype(np.float32)
        for _ in range(count)
    ]


def train(layer, xs, state):
    out = None
    for x in xs:
        out, state = run(layer, x, state)
    return out, state


@eqx.filter_jit
def train_repeatedly(layer, state, x, steps):
    """`steps` training steps on the same batch, compiled once per layer and shape."""
    body = lambda _, state: run(layer, x, state)[1]
    return jax.lax.fori_loop(0, steps, body, state)


@given(
    approach=st.sampled_from(DEBIASED + ("ema",)),
    momentum=st.one_of(
        st.sampled_from((0.9, 0.99, 0.999, 0.9999)), st.floats(0.5, 0.9999)
    ),
    steps=st.sampled_from((1, 2, 3, 10, 1000, 10000)),
    log_std=st.floats(-3, 3),
    loc=st.floats(-5, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_equal_batches_give_float32_exact_inference_statistics(
    approach, momentum, steps, log_std, loc, seed
):
    """After any number of steps on batches with identical statistics, inference uses
    that batch's mean and variance (unbiased for "batch" and "batch_renorm") with a
    relative error of at most 1e-5 against float64, at any standard deviation from
    1e-3 to 1e3 and any momentum up to 0.9999."""
    std = 10.0**log_std
    x = np.random.default_rng(seed).normal(loc, std, (64, 2)).astype(np.float32)
    layer, state = make(approach, channels=2, momentum=momentum, eps=0.0)
    state = train_repeatedly(layer, state, x, jnp.asarray(steps))
    mean, var = inference_stats(approach, [x], momentum)
    # Recover what inference uses from two probes: with eps=0 and no affine
    # parameters, out = (probe - mean) / sqrt(var).
    probes = np.stack([mean, mean + np.sqrt(var)]).astype(np.float32)
    out = np.asarray(run(layer, probes, state, inference=True)[0], np.float64)
    inv_std = (out[1] - out[0]) / (probes[1] - probes[0].astype(np.float64))
    np.testing.assert_allclose(1 / inv_std**2, var, rtol=1e-5)
    used_mean = probes[0] - out[0] / inv_std
    # The mean is a float32 sum of 64 values: exact to a few of its own ulps, and to
    # 1e-5 standard deviations.
    tol = 1e-5 * np.sqrt(var) + 8 * EPS32 * np.abs(mean)
    assert np.all(np.abs(used_mean - mean) <= tol)


@given(approach=st.sampled_from(LAYOUTS), momentum=momenta, data=st.data())
def test_running_averages_follow_the_closed_form(approach, momentum, data):
    """For any sequence of batches, inference uses the weighted sum of the batch
    statistics with the approach's weights: `(1 - m) m**(k - i) / (1 - m**k)` for batch
    i of k when debiased; for "ema", `m**(k - 1)` on the first batch and
    `(1 - m) m**(k - i)` after it. Before any step, mean 0 and variance 1."""
    steps = data.draw(st.integers(0, 6))
    xs = data.draw(batches(count=max(steps, 1)))[:steps]
    probe = data.draw(batches(shapes=(xs[0].shape,) if xs else SHAPES))[0]
    layer, state = make(approach, channels=probe.shape[1], momentum=momentum)
    _, state = train(layer, xs, state)
    out, _ = run(layer, probe, state, inference=True)
    mean, var = inference_stats(approach, xs, momentum)
    tol = tolerance(momentum, steps, mean, var)
    if approach == "mode=batch" and steps > 0:
        # 0.13's encoding stores m^k + (1 - m^k) var, which costs digits of var.
        tol *= 1 + momentum**steps / ((1 - momentum**steps) * np.min(var))
    np.testing.assert_allclose(
        out, normalise(probe, mean, var, 1e-5), rtol=tol, atol=tol
    )


@given(
    approach=st.sampled_from(LAYOUTS),
    momentum=momenta,
    steps=st.integers(1, 5),
    warmup=st.integers(0, 4),
    data=st.data(),
)
def test_training_output_follows_the_approach_formula(
    approach, momentum, steps, warmup, data
):
    """At every step, the training output equals the approach's formula, computed in
    float64 from the whole sequence of batches."""
    xs = data.draw(batches(count=steps))
    options = (
        {"warmup": warmup} if approach in ("batch_renorm", "ema_smooth_start") else {}
    )
    layer, state = make(approach, xs[0].shape[1], momentum=momentum, **options)
    for k in range(1, steps + 1):
        out, state = run(layer, xs[k - 1], state)
        expected = training_output(approach, xs[:k], momentum, 1e-5, **options)
        # Normalised values are O(1); the clipped renorm correction is O(d_max).
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=5e-4)


@given(momentum=momenta, steps=st.integers(2, 5), data=st.data())
def test_unclipped_batch_renorm_trains_like_it_infers(momentum, steps, data):
    """The defining property of Batch Renormalization (Ioffe 2017): from the second
    step on, with r and d unclipped, the training output equals the inference output
    of the running averages held before that step."""
    xs = data.draw(batches(count=steps))
    layer, state = make(
        "batch_renorm",
        xs[0].shape[1],
        momentum=momentum,
        r_max=1e6,
        d_max=1e6,
        warmup=0,
    )
    _, state = train(layer, xs[:-1], state)
    before, _ = run(layer, xs[-1], state, inference=True)
    out, _ = run(layer, xs[-1], state)
    scale = 1 + float(np.max(np.abs(before)))
    np.testing.assert_allclose(out, before, rtol=1e-4, atol=1e-4 * scale)


@given(
    approach=st.sampled_from(("batch", "batch_renorm")),
    xs=batches(),
    shift=st.floats(-100, 100),
    factor=st.floats(0.1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_training_is_invariant_to_shift_and_scale_and_equivariant_to_order(
    approach, xs, shift, factor, seed
):
    """With batch statistics (eps=0), shifting and positively scaling a channel leave
    the output unchanged, and permuting the batch permutes the output."""
    (x,) = xs
    layer, state = make(approach, x.shape[1], eps=0.0)
    out, _ = run(layer, x, state)
    channel = (1, -1) + (1,) * (x.ndim - 2)
    shifts = shift * np.arange(1, x.shape[1] + 1).reshape(channel)
    factors = factor * np.linspace(1, 2, x.shape[1]).reshape(channel)
    moved, _ = run(layer, (x * factors + shifts).astype(np.float32), state)
    spread = float(
        np.max(np.abs(x * factors + shifts)) / (np.min(x.std(axis=0)) * factor + 1e-3)
    )
    np.testing.assert_allclose(moved, out, atol=1e-5 * (10 + spread))
    order = np.random.default_rng(seed).permutation(x.shape[0])
    permuted, _ = run(layer, x[order], state)
    np.testing.assert_allclose(permuted, np.asarray(out)[order], rtol=1e-5, atol=1e-5)


@eqx.filter_jit
def weighted_sum_grad(layer, state, x, weights):
    """d/dx of sum(weights * training output), compiled once per layer and shape."""
    return jax.grad(lambda x: jnp.sum(weights * run(layer, x, state)[0]))(x)


def plain_batch_norm(x, eps):
    """Training-mode batch normalisation in plain jax.numpy, batch axis first."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


@given(xs=batches(), seed=st.integers(0, 2**32 - 1))
def test_batch_statistics_gradients_match_plain_jnp(xs, seed):
    """ "batch": the gradient of a weighted sum of the outputs equals that of plain
    jnp batch normalisation."""
    (x,) = xs
    layer, state = make("batch", x.shape[1], channelwise_affine=False)
    weights = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
    expected = jax.grad(lambda x: jnp.sum(weights * plain_batch_norm(x, 1e-5)))(x)
    actual = weighted_sum_grad(layer, state, jnp.asarray(x), jnp.asarray(weights))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)


@given(momentum=st.sampled_from((0.01, 0.5, 0.99)), data=st.data())
def test_batch_renorm_corrections_carry_no_gradient(momentum, data):
    """On a step with clipped or unclipped r and d, the input gradient of Batch
    Renormalization is that of plain batch normalisation with the cotangent scaled by
    r per channel: r and d act as constants."""
    first, second = data.draw(batches(count=2))
    layer, state = make(
        "batch_renorm",
        first.shape[1],
        momentum=momentum,
        r_max=1.5,
        d_max=0.5,
        warmup=0,
    )
    _, state = run(layer, first, state)
    weights = np.random.default_rng(0).normal(size=second.shape).astype(np.float32)
    _, var_r = inference_stats("batch_renorm", [first], momentum)
    _, var_b, _ = moments(second)
    r = np.clip(np.sqrt(var_b + 1e-5) / np.sqrt(var_r + 1e-5), 1 / 1.5, 1.5)
    r = r.reshape((1, -1) + (1,) * (second.ndim - 2)).astype(np.float32)
    expected = jax.grad(lambda x: jnp.sum(weights * r * plain_batch_norm(x, 1e-5)))(
        second
    )
    actual = weighted_sum_grad(layer, state, jnp.asarray(second), jnp.asarray(weights))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)


@given(
    approach=st.sampled_from(LAYOUTS),
    xs=batches(min_batch=1),
    eps=st.floats(0, 1),
)
def test_inference_before_training_is_unit_normalisation(approach, xs, eps):
    """Before any training step, inference outputs `x / sqrt(1 + eps)` (equinox issue
    #955: not x / sqrt(eps)), and leaves the state unchanged."""
    (x,) = xs
    layer, state = make(approach, x.shape[1], eps=eps)
    out, new_state = run(layer, x, state, inference=True)
    np.testing.assert_allclose(out, x / np.sqrt(1 + eps), rtol=2e-6, atol=1e-6)
    assert eqx.tree_equal(new_state, state)


@given(
    approach=st.sampled_from(APPROACHES),
    dtype=st.sampled_from((jnp.float16, jnp.bfloat16)),
    xs=batches(count=2),
    magnitude=st.sampled_from((1.0, 1e3, 3e4)),
)
def test_half_precision_matches_float32(approach, dtype, xs, magnitude):
    """fp16/bf16 inputs give their own dtype, stay finite even where an fp16 sum
    overflows, keep float32 statistics, and match a float32 run on the same (rounded)
    inputs within the dtype's resolution."""
    peak = max(float(np.max(np.abs(x))) for x in xs)
    xs = [np.asarray(jnp.asarray(x * (magnitude / peak), dtype)) for x in xs]
    layer, half_state = make(approach, xs[0].shape[1], momentum=0.9)
    full_state = jax.tree_util.tree_map(jnp.copy, half_state)  # a second, valid state
    resolution = float(jnp.finfo(dtype).eps)
    for x in xs:
        half, half_state = run(layer, jnp.asarray(x, dtype), half_state)
        full, full_state = run(layer, np.asarray(x, np.float32), full_state)
        assert half.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(half, np.float32), full, rtol=4 * resolution, atol=8 * resolution
        )
    for a, b in zip(
        jax.tree_util.tree_leaves(half_state), jax.tree_util.tree_leaves(full_state)
    ):
        assert a.dtype != jnp.float16 and a.dtype != jnp.bfloat16
        np.testing.assert_array_equal(a, b)


MATRIX = np.array([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]])


class TwoNorms(eqx.Module):
    """`BatchNorm`, a fixed linear map and ReLU, then a second `BatchNorm`: the second
    one's statistics depend on how the first normalised each batch."""

    first: eqx.nn.BatchNorm
    second: eqx.nn.BatchNorm

    def __init__(self, approach, momentum):
        self.first = batch_norm(approach, 3, momentum=momentum)
        self.second = batch_norm(approach, 2, momentum=momentum)

    def __call__(self, x, state, *, mask=None):
        x, state = self.first(x, state, mask=mask)
        x = jnp.asarray(MATRIX, jnp.float32) @ x + 0.5
        return self.second(jax.nn.relu(x), state, mask=mask)


def forward(model, state, batch):
    x, mask = batch
    return run(model, x, state, mask=mask)


def forward_unmasked(model, state, x):
    return run(model, x, state)


def reference_recompute(batches, masks, unbiased):
    """Float64: each batch normalised through `TwoNorms` (weight 1, bias 0) by the
    statistics of its own valid values; then each layer's pooled statistics."""
    hidden = []
    for x, mask in zip(batches, masks):
        if not np.any(mask):  # only padding: what the second layer sees is ignored
            hidden.append(np.zeros((len(x), 2)))
            continue
        mean, var, _ = moments(x, mask)
        hidden.append(np.maximum(normalise(x, mean, var, 1e-5) @ MATRIX.T + 0.5, 0))
    return [pooled_statistics(inputs, masks, unbiased) for inputs in (batches, hidden)]


@st.composite
def ragged_stream(draw):
    """Batches of 2 to 9 examples, each example valid or padding, with at least one
    batch of two valid examples."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Few sizes, so that each layer's step compiles a few times in all.
    sizes = draw(st.lists(st.sampled_from((2, 5, 8)), min_size=1, max_size=5))
    batches = [
        (rng.normal(1, 2, (n, 3)) * rng.uniform(0.5, 2, (1, 3))).astype(np.float32)
        for n in sizes
    ]
    masks = [rng.random(n) < draw(st.floats(0.3, 1.0)) for n in sizes]
    masks[0][:2] = True
    return batches, masks


def assert_inference_uses(norm, state, mean, var, rng):
    probe = rng.normal(size=(4, norm.input_size)).astype(np.float32)
    out, _ = run(norm, probe, state, inference=True)
    tol = 64 * EPS32 * (1 + np.max(np.abs(mean)) / np.sqrt(np.min(var) + 1e-5))
    np.testing.assert_allclose(
        out, normalise(probe, mean, var, 1e-5), rtol=tol, atol=tol
    )


@given(
    approach=st.sampled_from(LAYOUTS),
    momentum=st.sampled_from((0.5, 0.9, 0.999)),
    stream=ragged_stream(),
    trained=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_recomputed_statistics_pool_the_valid_values_of_a_ragged_stream(
    approach, momentum, stream, trained, seed
):
    """Recomputing from a stream of batches of different sizes, with padding, makes
    inference use in every `BatchNorm` the mean of all valid values and the pooled
    within-batch variance (over n_b - 1 for "batch", "batch_renorm" and `mode=`, over
    n_b otherwise), to float32 precision; whatever the training before."""
    rng = np.random.default_rng(seed)
    batches, masks = stream
    # `make_with_state` names the state after the model, so compilations are reused.
    model, state = eqx.nn.make_with_state(TwoNorms)(approach, momentum)
    if trained:
        _, state = run(model, rng.normal(3, 2, (8, 3)).astype(np.float32), state)
    stream = ((x, mask) for x, mask in zip(batches, masks))
    state = eqx.nn.recompute_batch_norm_statistics(forward, model, state, stream)
    expected = reference_recompute(batches, masks, approach in UNBIASED)
    for norm, (mean, var) in zip((model.first, model.second), expected):
        assert_inference_uses(norm, state, mean, var, rng)


@given(approach=st.sampled_from(LAYOUTS), xs=batches(count=4), seed=st.integers(0, 99))
def test_stacked_streamed_and_reordered_batches_recompute_alike(approach, xs, seed):
    """Recomputing from equal batches gives the same statistics whether they come
    stacked in one array, as a generator, or in another order (to float32
    rounding)."""
    layer, state = make(approach, xs[0].shape[1])
    recompute = eqx.nn.recompute_batch_norm_statistics
    copy = lambda: jax.tree_util.tree_map(lambda x: x, state)
    stacked = recompute(forward_unmasked, layer, copy(), np.stack(xs))
    order = np.random.default_rng(seed).permutation(len(xs))
    streamed = recompute(forward_unmasked, layer, copy(), (xs[i] for i in order))
    for a, b in zip(
        jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(streamed)
    ):
        np.testing.assert_allclose(a, b, rtol=8 * EPS32, atol=8 * EPS32)


@st.composite
def masked_batch(draw):
    """A float32 batch `(batch, channels, length)` and a per-position mask with at
    least two valid values."""
    (x,) = draw(batches(shapes=((4, 3, 5), (6, 2, 3))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = rng.random((x.shape[0], x.shape[2])) < draw(st.floats(0.2, 1.0))
    mask[0, :2] = True
    return x, mask


@given(approach=st.sampled_from(LAYOUTS), batch=masked_batch())
def test_masked_training_uses_the_statistics_of_the_valid_values(approach, batch):
    """A training step with a mask normalises the valid positions with the mean and
    biased variance of the valid values only, outputs 0 at masked positions, and
    (for "batch") stores their mean and unbiased variance."""
    x, mask = batch
    layer, state = make(approach, x.shape[1], momentum=0.5)
    out, state = run(layer, x, state, mask=mask)
    mean, var, unbiased = moments(x, mask)
    expected = normalise(x, mean, var, 1e-5)
    valid = np.broadcast_to(mask[:, None], x.shape)
    np.testing.assert_allclose(
        np.asarray(out)[valid], expected[valid], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(out)[~valid], 0)
    if approach == "batch":
        assert layer.batch_state_index is not None
        stored = state.get(layer.batch_state_index)
        np.testing.assert_allclose(stored[0], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored[1], unbiased, rtol=1e-5)


@given(
    approach=st.sampled_from(LAYOUTS),
    batch=masked_batch(),
    garbage=st.sampled_from((np.nan, np.inf, -1e30, 7.0)),
)
def test_padding_values_even_nan_change_nothing(approach, batch, garbage):
    """Whatever fills the masked positions (NaN, inf, huge or ordinary values), the
    outputs, the new state and the gradients with respect to the parameters and the
    input are those of zero padding."""
    x, mask = batch
    layer, state = make(approach, x.shape[1], momentum=0.5)
    _, state = run(layer, x, state, mask=mask)  # a step, so running averages matter
    valid = np.broadcast_to(mask[:, None], x.shape)
    weights = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)

    def loss(layer, x):
        out, new_state = run(layer, x, state, mask=mask)
        return jnp.sum(weights * out), (out, new_state)

    grad = eqx.filter_grad(loss, has_aux=True)
    clean = grad(layer, np.where(valid, x, 0).astype(np.float32))
    dirty = grad(layer, np.where(valid, x, garbage).astype(np.float32))
    assert eqx.tree_equal(dirty, clean)


@example(offset=0.0, distance=1e5, sign=-1.0, log_std=0.0, seed=213537)
@given(
    offset=st.sampled_from((0.0, 1.0, 1e2, 1e3, 1e4, 1e5)),
    distance=st.sampled_from((0.0, 1.0, 3.0, 10.0, 1e2, 1e4, 1e5)),
    sign=st.sampled_from((-1.0, 1.0)),
    log_std=st.floats(-3, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_pass_variance_is_exact_at_any_distance_from_the_running_mean(
    offset, distance, sign, log_std, seed
):
    """Training statistics are one pass shifted by the running mean: at any mean up to
    1e5 standard deviations from zero (the first step) or from the running mean (a
    later step), the stored variance has a relative error of at most 1e-4 against
    float64."""
    std = 10.0**log_std
    rng = np.random.default_rng(seed)
    mean = sign * offset * std
    first = rng.normal(mean + distance * std, std, (64, 2)).astype(np.float32)
    second = rng.normal(mean, std, (64, 2)).astype(np.float32)
    layer, state = make("batch", channels=2, momentum=1e-6)
    assert layer.batch_state_index is not None
    for k, xs in ((1, [first]), (2, [first, second])):
        _, state = run(layer, xs[-1], state)
        _, expected = inference_stats("batch", xs, 1e-6)
        stored = np.asarray(state.get(layer.batch_state_index)[1], np.float64)
        np.testing.assert_allclose(stored, expected, rtol=1e-4, err_msg=f"step {k}")
