"""Property-based tests of `eqx.nn.BatchNorm(approach=...)`.

Each test states one property in its docstring and checks it on examples drawn by
hypothesis against an independent computation: the float64 NumPy closed forms of
`batch_norm_reference.py`, plain `jax.numpy`, or Flax/Haiku where their semantics
coincide. Layers run eagerly (no `jit`), so momentum and eps can vary per example
without recompiling.

Profiles: `ci` (the default; 200 examples per property, derandomised) and `dev` (quick),
chosen with the environment variable `BATCHNORM_HYPOTHESIS_PROFILE`.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from batch_norm_reference import (
    APPROACHES,
    inference_stats,
    moments,
    normalise,
    training_output,
)
from hypothesis import given, HealthCheck, settings, strategies as st


settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("BATCHNORM_HYPOTHESIS_PROFILE", "ci"))

RUNNING = ("batch", "batch_renorm", "ema_debiased", "ema_smooth_start")
EPS32 = float(np.finfo(np.float32).eps)
# A few shapes, so that the eager primitives' compilation caches stay warm.
SPATIAL = ((), (3,), (2, 2), (2, 1, 2))


@st.composite
def momenta(draw):
    """Momentum in (0, 1), including values near 0 and near 1."""
    return draw(
        st.one_of(
            st.sampled_from((0.01, 0.1, 0.5, 0.9, 0.99, 0.999)),
            st.floats(0.01, 0.999),
        )
    )


@st.composite
def batches(draw, count=1, min_batch=2, dtype=np.float32, few_shapes=False):
    """`count` batches of one shape `(batch, channels, *spatial)`, with per-channel
    offsets and scales so that statistics differ across channels and batches.
    `few_shapes` draws from four shapes only, for tests that compile per shape."""
    if few_shapes:
        shape = draw(st.sampled_from(((2, 1), (5, 3), (3, 2, 3), (2, 3, 2, 2))))
        batch, channels, spatial = shape[0], shape[1], shape[2:]
    else:
        batch = draw(st.sampled_from((2, 3, 5, 8)))
        channels = draw(st.integers(1, 3))
        spatial = draw(st.sampled_from(SPATIAL))
    batch = max(batch, min_batch)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (batch, channels) + spatial
    loc = draw(st.floats(-5, 5))
    scale = draw(st.floats(0.2, 5))
    out = []
    for _ in range(count):
        offsets = rng.normal(loc, 1.0, (1, channels) + (1,) * len(spatial))
        scales = scale * rng.uniform(0.5, 2.0, (1, channels) + (1,) * len(spatial))
        out.append((offsets + scales * rng.normal(size=shape)).astype(dtype))
    return out


def make(approach, channels, **kwargs):
    return eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, "batch", approach=approach, **kwargs
    )


def run(layer, x, state, inference=False):
    if inference:
        layer = eqx.nn.inference_mode(layer)
    return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        jnp.asarray(x), state
    )


def train(layer, xs, state):
    out = None
    for x in xs:
        out, state = run(layer, x, state)
    return out, state


def output_tolerance(momentum, steps, mean, var):
    """Tolerance on normalised outputs: `precision` scaled by how much rounding the
    mean is amplified, |mean| / std."""
    amplification = 1 + np.max(np.abs(mean)) / np.sqrt(np.min(var) + 1e-5)
    return 4 * precision(momentum, steps) * amplification


def precision(momentum, steps):
    """Relative float32 tolerance for running statistics after `steps` updates: about
    eps per effective step of the EMA, plus the `m**k / (1 - m**k)` amplification
    of the "batch" approach's seeded variance."""
    effective = min(steps, 1 / (1 - momentum))
    return 32 * EPS32 * (effective + momentum**steps / (1 - momentum**steps))


@given(
    approach=st.sampled_from(RUNNING),
    momentum=momenta(),
    steps=st.integers(1, 30),
    xs=batches(),
)
def test_inference_stats_are_exactly_debiased(approach, momentum, steps, xs):
    """After k >= 1 steps on batches with identical statistics, inference normalises
    with that batch's mean and variance (unbiased for "batch" and "batch_renorm").

    Stock 0.13.8 `mode="batch"` fails this: its inference variance is too large by
    `m**k / (1 - m**k)`, e.g. +99 after one step at momentum 0.99."""
    (x,) = xs
    layer, state = make(approach, x.shape[1], momentum=momentum)
    _, state = train(layer, [x] * steps, state)
    out, _ = run(layer, x, state, inference=True)
    mean, var = inference_stats(approach, [x], momentum)
    tol = output_tolerance(momentum, steps, mean, var)
    np.testing.assert_allclose(out, normalise(x, mean, var, 1e-5), rtol=tol, atol=tol)


@given(
    approach=st.sampled_from(APPROACHES),
    momentum=momenta(),
    steps=st.integers(1, 6),
    data=st.data(),
)
def test_running_statistics_follow_the_closed_form(approach, momentum, steps, data):
    """For any sequence of batches, inference uses the weighted sum of the batch
    statistics with the approach's weights: `(1 - m) m**(k - i) / (1 - m**k)` when
    debiased; `m**(k - 1)` on the first batch and `(1 - m) m**(k - i)` after it for
    "ema". The variance is the unbiased one for "batch"/"batch_renorm"."""
    xs = data.draw(batches(count=steps))
    layer, state = make(approach, xs[0].shape[1], momentum=momentum)
    _, state = train(layer, xs, state)
    probe = data.draw(batches())[0]
    probe = np.resize(probe, xs[0].shape).astype(np.float32)
    out, _ = run(layer, probe, state, inference=True)
    mean, var = inference_stats(approach, xs, momentum)
    tol = (
        4
        * precision(momentum, steps)
        * (1 + np.max(np.abs(mean)) / np.sqrt(np.min(var) + 1e-5))
    )
    np.testing.assert_allclose(
        out, normalise(probe, mean, var, 1e-5), rtol=tol, atol=tol
    )


@given(
    approach=st.sampled_from(APPROACHES),
    momentum=momenta(),
    steps=st.integers(1, 5),
    warmup=st.integers(0, 4),
    data=st.data(),
)
def test_training_output_follows_the_approach_formula(
    approach, momentum, steps, warmup, data
):
    """The training output at every step equals the approach's formula, computed in
    float64 from the whole sequence of batches."""
    xs = data.draw(batches(count=steps))
    takes_warmup = approach in ("batch_renorm", "ema_smooth_start")
    kwargs = {"warmup": warmup} if takes_warmup else {}
    layer, state = make(approach, xs[0].shape[1], momentum=momentum, **kwargs)
    for k in range(1, steps + 1):
        out, state = run(layer, xs[k - 1], state)
        expected = training_output(approach, xs[:k], momentum, 1e-5, **kwargs)
        # Normalised values are O(1); the clipped renorm correction is O(d_max).
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=5e-4)


@given(momentum=momenta(), steps=st.integers(2, 6), data=st.data())
def test_unclipped_batch_renorm_trains_like_it_infers(momentum, steps, data):
    """From the second step on, with r and d unclipped, Batch Renormalization's
    training output equals the inference output of the statistics held before that
    step. (The first step uses r = 1, d = 0: plain batch statistics.)"""
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
    approach=st.sampled_from(("ema", "ema_debiased")),
    momentum=momenta(),
    steps=st.integers(1, 6),
    data=st.data(),
)
def test_ema_family_trains_like_it_infers_after_the_update(
    approach, momentum, steps, data
):
    """The "ema" and "ema_debiased" approaches normalise the training batch with
    exactly the statistics that inference uses after that step's update."""
    xs = data.draw(batches(count=steps))
    layer, state = make(approach, xs[0].shape[1], momentum=momentum)
    out, state = train(layer, xs, state)
    after, _ = run(layer, xs[-1], state, inference=True)
    assert out is not None
    np.testing.assert_allclose(out, after, rtol=1e-5, atol=1e-5)


def test_batch_inference_matches_training_on_iid_batches():
    """ "batch": after many steps on i.i.d. batches from one distribution, inference on
    a fresh batch matches that batch's training output, within the sampling error of
    the batch statistics (about `|z| / sqrt(2n)` for the scale, `1 / sqrt(n)` for the
    shift, with n values per channel)."""
    rng = np.random.default_rng(0)
    n_batch, channels, spatial = 16, 3, (4,)
    loc = np.array([1.0, -2.0, 0.5])[None, :, None]
    scale = np.array([0.5, 2.0, 3.0])[None, :, None]
    layer, state = make("batch", channels, momentum=0.95)
    step = jax.jit(
        jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    )
    for _ in range(300):
        x = loc + scale * rng.normal(size=(n_batch, channels) + spatial)
        _, state = step(jnp.asarray(x, jnp.float32), state)
    fresh = jnp.asarray(loc + scale * rng.normal(size=(n_batch, channels) + spatial))
    fresh = fresh.astype(jnp.float32)
    trained, _ = run(layer, fresh, state)
    inferred, _ = run(layer, fresh, state, inference=True)
    n = n_batch * spatial[0]
    bound = 5 * (1 + np.abs(np.asarray(trained))) / np.sqrt(n)
    assert np.all(np.abs(np.asarray(inferred) - np.asarray(trained)) < bound)


@given(
    approach=st.sampled_from(("batch", "batch_renorm")),
    xs=batches(),
    eps=st.sampled_from((0.0, 1e-5, 1e-3)),
)
def test_training_normalises_each_channel(approach, xs, eps):
    """On the first step, the batch-statistics approaches give each channel mean 0 and
    biased variance var / (var + eps)."""
    (x,) = xs
    layer, state = make(approach, x.shape[1], eps=eps, channelwise_affine=False)
    out, _ = run(layer, x, state)
    out = np.asarray(out, np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    _, var, _ = moments(x)
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(
        out.var(axis=axes), var / (var + eps), rtol=1e-3, atol=1e-4
    )


@given(
    approach=st.sampled_from(("batch", "batch_renorm")),
    xs=batches(),
    shift=st.floats(-100, 100),
    factor=st.floats(0.1, 10),
    seed=st.integers(0, 2**31 - 1),
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
def _weighted_sum_grad(layer, state, x, weights):
    """d/dx of sum(weights * training output), compiled once per layer and shape."""

    def loss(x):
        return jnp.sum(weights * run(layer, x, state)[0])

    return jax.grad(loss)(x)


def _plain_batch_norm(x, eps):
    """Training-mode batch normalisation in plain jax.numpy, batch axis first."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


@given(xs=batches(few_shapes=True), seed=st.integers(0, 2**31 - 1))
def test_batch_statistics_gradients_match_plain_jnp(xs, seed):
    """ "batch": the gradient of a weighted sum of the outputs equals that of plain
    jnp batch normalisation, and the gradient of the plain sum is ~0 (the output's
    channel means are always 0)."""
    (x,) = xs
    layer, state = make("batch", x.shape[1], channelwise_affine=False)
    weights = jnp.asarray(np.random.default_rng(seed).normal(size=x.shape), jnp.float32)

    def plain(x, w):
        return jnp.sum(w * _plain_batch_norm(x, 1e-5))

    x = jnp.asarray(x)
    np.testing.assert_allclose(
        _weighted_sum_grad(layer, state, x, weights),
        jax.grad(plain)(x, weights),
        rtol=1e-3,
        atol=1e-3,
    )
    flat = _weighted_sum_grad(layer, state, x, jnp.ones_like(x))
    assert float(jnp.max(jnp.abs(flat))) < 1e-3 * (
        1 + float(1 / jnp.min(jnp.std(x, axis=0)))
    )


@given(
    momentum=st.sampled_from((0.01, 0.5, 0.99)),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_renorm_corrections_carry_no_gradient(momentum, data, seed):
    """On a step with clipped or unclipped r and d, the input gradient of
    Batch Renormalization is that of plain batch normalisation with the cotangent
    scaled by r per channel: r and d act as constants."""
    first, second = data.draw(batches(count=2, few_shapes=True))
    layer, state = make(
        "batch_renorm",
        first.shape[1],
        momentum=momentum,
        r_max=1.5,
        d_max=0.5,
        warmup=0,
    )
    _, state = run(layer, first, state)
    weights = jnp.asarray(
        np.random.default_rng(seed).normal(size=second.shape), jnp.float32
    )
    mean_r, var_r = inference_stats("batch_renorm", [first], momentum)
    _, var_b, _ = moments(second)
    r = np.clip(np.sqrt(var_b + 1e-5) / np.sqrt(var_r + 1e-5), 1 / 1.5, 1.5)
    channel = (1, -1) + (1,) * (second.ndim - 2)
    r = jnp.asarray(r.reshape(channel), jnp.float32)

    def ours(x):
        return jnp.sum(weights * run(layer, x, state)[0])

    def plain(x):
        return jnp.sum(weights * r * _plain_batch_norm(x, 1e-5))

    x = jnp.asarray(second)
    np.testing.assert_allclose(
        jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-3, atol=1e-3
    )


@given(
    approach=st.sampled_from(APPROACHES),
    xs=batches(min_batch=1),
    eps=st.floats(0, 1),
)
def test_inference_before_training_is_unit_normalisation(approach, xs, eps):
    """Before any training step, inference outputs `(x - 0) / sqrt(1 + eps)`."""
    (x,) = xs
    layer, state = make(approach, x.shape[1], eps=eps)
    out, _ = run(layer, x, state, inference=True)
    np.testing.assert_allclose(out, x / np.sqrt(1 + eps), rtol=2e-6, atol=1e-6)


@given(
    approach=st.sampled_from(APPROACHES),
    dtype=st.sampled_from((jnp.float16, jnp.bfloat16)),
    xs=batches(count=2),
    magnitude=st.sampled_from((1.0, 1e3, 3e4)),
)
def test_half_precision_matches_float32(approach, dtype, xs, magnitude):
    """fp16/bf16 inputs give their own dtype, stay finite even where fp16 sums
    overflow, and match a float32 run on the same (rounded) inputs within the
    dtype's resolution."""
    peak = max(float(np.max(np.abs(x))) for x in xs)
    xs = [np.asarray(jnp.asarray(x * (magnitude / peak), dtype)) for x in xs]
    layer, state = make(approach, xs[0].shape[1], momentum=0.9)
    half_state = state
    full_state = jax.tree_util.tree_map(lambda a: a, state)
    for x in xs:
        half, half_state = run(layer, jnp.asarray(x, dtype), half_state)
        full, full_state = run(layer, np.asarray(x, np.float32), full_state)
        assert half.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(half)))
        resolution = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(
            np.asarray(half, np.float32), full, rtol=4 * resolution, atol=8 * resolution
        )
    for a, b in zip(
        jax.tree_util.tree_leaves(half_state), jax.tree_util.tree_leaves(full_state)
    ):
        np.testing.assert_array_equal(a, b)


@given(xs=batches(count=3), momentum=momenta())
def test_batch_training_output_equals_flax(xs, momentum):
    """ "batch"'s training output equals Flax linen's
    `BatchNorm(use_running_average=False, use_fast_variance=False)`."""
    import flax.linen as flax_nn

    reference = flax_nn.BatchNorm(
        use_running_average=False,
        use_fast_variance=False,
        axis=1,
        momentum=momentum,
        epsilon=1e-5,
    )
    variables = reference.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]))
    layer, state = make("batch", xs[0].shape[1], momentum=momentum)
    for x in xs:
        expected, updates = reference.apply(
            variables, jnp.asarray(x), mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
        out, state = run(layer, x, state)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@given(xs=batches(count=4), momentum=momenta())
def test_debiased_running_mean_equals_haiku_ema(xs, momentum):
    """ "ema_debiased"'s inference mean equals the average kept by Haiku's
    `ExponentialMovingAverage(zero_debias=True)` of the batch means."""
    import haiku as hk

    def average(value):
        return hk.ExponentialMovingAverage(momentum, zero_debias=True)(value)

    ema = hk.transform_with_state(average)
    channels = xs[0].shape[1]
    _, ema_state = ema.init(None, jnp.zeros(channels, jnp.float32))
    layer, state = make("ema_debiased", channels, momentum=momentum, eps=0.0)
    expected = None
    for x in xs:
        expected, ema_state = ema.apply(
            {}, ema_state, None, jnp.asarray(moments(x)[0], jnp.float32)
        )
        _, state = run(layer, x, state)
    # With eps=0 and no affine, inference is (x - mean) * inv_std: inputs of all 0
    # and all 1 give inv_std = out(1) - out(0) and mean = -out(0) / inv_std.
    probe = np.zeros_like(xs[0])
    zero_out, _ = run(layer, probe, state, inference=True)
    one_out, _ = run(layer, probe + 1, state, inference=True)
    inv_std = np.asarray(one_out - zero_out)[0].reshape(channels, -1)[:, 0]
    mean = -np.asarray(zero_out)[0].reshape(channels, -1)[:, 0] / inv_std
    assert expected is not None
    np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-4)


@given(
    mode=st.sampled_from(("ema", "batch")),
    counter=st.integers(1, 50),
    momentum=momenta(),
    seed=st.integers(0, 2**31 - 1),
)
def test_equinox_0_13_layout_loads(mode, counter, momentum, seed, tmp_path_factory):
    """A checkpoint laid out as 0.13.8 documents it (model: weight, bias, `inference`;
    state: a first-step flag or a step counter, then the running mean and variance)
    loads with `mode=`. "ema" infers with the stored statistics; "batch" with
    `hidden_mean / (1 - m**k)` and `(hidden_var - m**k) / (1 - m**k)`, because 0.13.8
    started the variance accumulator at 1."""
    rng = np.random.default_rng(seed)
    weight, bias = (
        rng.normal(size=3).astype(np.float32),
        rng.normal(size=3).astype(np.float32),
    )
    mean = rng.normal(size=3).astype(np.float32)
    var = rng.uniform(0.5, 3, size=3).astype(np.float32)
    m, k = np.float32(momentum), counter
    if mode == "ema":
        first = np.array(False)
        leaves = (weight, bias, False, first, mean, var)
        expected_mean, expected_var = mean, var
    else:
        decay = float(m) ** k
        hidden_mean = (mean * (1 - decay)).astype(np.float32)
        hidden_var = (decay + var * (1 - decay)).astype(np.float32)
        leaves = (weight, bias, False, np.array(k, np.int32), hidden_mean, hidden_var)
        expected_mean = hidden_mean / (1 - decay)
        expected_var = (hidden_var - decay) / (1 - decay)
    path = tmp_path_factory.mktemp("ckpt") / "bn.eqx"
    eqx.tree_serialise_leaves(path, leaves)
    like = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", mode=mode, momentum=momentum
    )
    layer, state = eqx.tree_deserialise_leaves(path, like)
    x = rng.normal(size=(4, 3, 2)).astype(np.float32)
    out, _ = run(layer, x, state, inference=True)
    channel = (1, -1, 1)
    expected = normalise(x, expected_mean, expected_var, 1e-5) * weight.reshape(
        channel
    ) + bias.reshape(channel)
    tol = precision(float(m), k)
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
