"""Unit tests of `eqx.nn.BatchNorm(approach=...)`: the rules of the layer's contract,
compatibility with Equinox 0.13, and multi-device use. The randomised properties are in
`test_batch_norm_properties.py`. Expected values come from `batch_norm_reference.py`
(float64 NumPy) or from formulas written out here, never from the layer itself."""

import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .batch_norm_reference import (
    APPROACHES,
    inference_stats,
    make,
    normalise,
    run,
)


DATA = Path(__file__).parent / "data"


def normal(seed, shape, loc=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def test_unset_approach_warns_with_the_choices_and_the_recommendation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = eqx.nn.BatchNorm(3, "batch")
    assert len(caught) == 1
    assert caught[0].filename == __file__  # attributed to the caller's line
    message = str(caught[0].message)
    for approach in APPROACHES:
        assert repr(approach) in message
    assert "approach=" in message and "'batch' is recommended" in message
    assert "recompute_statistics" in message and "batch_norm_approaches" in message
    assert layer.approach == "ema" and layer.momentum == 0.99


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_mode_is_a_silent_spelling_with_the_0_13_layout(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old, old_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "b", mode=mode)
    new, new_state = make(mode, axis_name="b")
    assert old.approach == mode and old.mode == mode and new.mode is None
    assert old.momentum == 0.99
    structure = lambda s: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(s)]
    assert structure(old_state) == structure(new_state)


def test_default_momentum_is_0_9_except_for_the_0_13_spellings():
    assert make("batch")[0].momentum == 0.9
    assert make("batch_renorm")[0].momentum == 0.9
    assert make("ema")[0].momentum == 0.99
    assert make("mode=batch")[0].momentum == 0.99
    assert make("batch", momentum=0.5)[0].momentum == 0.5


def test_positional_arguments_keep_upstream_order():
    layer = eqx.nn.BatchNorm(4, "b", 0.1, False, 0.5, True, jnp.float32, "batch")
    assert (layer.input_size, layer.axis_name, layer.eps) == (4, "b", 0.1)
    assert (layer.channelwise_affine, layer.momentum) == (False, 0.5)
    assert layer.inference is True and layer.approach == "batch"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(approach="batchnorm"), ["approach='batchnorm'", "'ema_smooth_start'"]),
        (dict(mode="legacy"), ["mode", "'legacy'", "approach="]),
        (dict(mode="batch", approach="batch"), ["only one", "drop `mode`"]),
        (dict(approach="batch", momentum=0.0), ["momentum", "between 0 and 1"]),
        (dict(approach="batch", momentum=1.0), ["momentum", "0.9"]),
        (dict(approach="batch", eps=-1e-5), ["eps", "non-negative"]),
        (dict(approach="batch", r_max=2.0), ["r_max", "batch_renorm", "Remove"]),
        (dict(approach="ema", d_max=2.0), ["d_max", "batch_renorm"]),
        (dict(approach="batch", warmup=10), ["warmup", "ema_smooth_start"]),
        (dict(approach="batch_renorm", r_max=0.5), ["r_max", "at least 1"]),
        (dict(approach="batch_renorm", d_max=-1.0), ["d_max", "at least 0"]),
        (dict(approach="ema_smooth_start", warmup=-3), ["warmup", "non-negative"]),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as error:
        eqx.nn.BatchNorm(3, "batch", **kwargs)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("approach", APPROACHES)
def test_channel_mismatch_is_reported_at_trace_time(approach):
    layer, state = make(approach, channels=5)
    with pytest.raises(ValueError, match=r"input_size=5.*\(6, 2\)"):
        jax.eval_shape(lambda x: run(layer, x, state), jnp.zeros((10, 6, 2)))


def test_missing_axis_name_is_a_name_error():
    layer, state = make("batch")
    with pytest.raises(NameError):
        layer(jnp.zeros(3), state)
    with pytest.raises(NameError):
        jax.vmap(layer, in_axes=(0, None), out_axes=(0, None))(jnp.zeros((2, 3)), state)


@pytest.mark.parametrize("approach", APPROACHES)
def test_single_value_per_channel_stays_finite(approach):
    """One example without spatial dimensions: the state and the gradient are finite,
    and the batch-statistics approaches output the bias (variance 0)."""
    layer, state = make(approach)
    layer = eqx.tree_at(lambda m: m.bias, layer, jnp.array([1.0, 2.0, 3.0]))

    def loss(x):
        out, new_state = run(layer, x, state)
        return jnp.sum(out), (out, new_state)

    grad, (out, new_state) = jax.grad(loss, has_aux=True)(jnp.array([[0.3, -2, 7]]))
    assert bool(jnp.all(jnp.isfinite(grad)))
    if approach != "ema":  # "ema" blends in its running averages
        np.testing.assert_allclose(out, [[1.0, 2.0, 3.0]], atol=1e-3)
    for leaf in jax.tree_util.tree_leaves(new_state):
        assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("approach", APPROACHES)
def test_each_approach_keeps_only_its_state(approach):
    layer, state = make(approach)
    dtypes = [leaf.dtype for leaf in jax.tree_util.tree_leaves(state)]
    if approach == "ema":
        assert layer.batch_counter is None and layer.batch_state_index is None
        assert dtypes == [jnp.bool_, jnp.float32, jnp.float32]
    else:
        assert layer.ema_first_time_index is None and layer.ema_state_index is None
        assert dtypes == [jnp.int32, jnp.float32, jnp.float32]


def test_half_precision_parameters_keep_float32_state():
    layer, state = make("batch", dtype=jnp.float16)
    assert layer.weight is not None and layer.weight.dtype == jnp.float16
    leaves = jax.tree_util.tree_leaves(state)
    assert [leaf.dtype for leaf in leaves] == [jnp.int32, jnp.float32, jnp.float32]


@pytest.mark.parametrize("momentum", (0.1, 0.9, 0.99))
def test_ema_reproduces_equinox_0_13_8_training(momentum):
    """`"ema"` follows 0.13.8's `mode="ema"` step by step (outputs, state and input
    gradients), against a plain-jnp rewrite of 0.13.8's formula."""

    def legacy(x, first_time, running_mean, running_var):
        # The first step uses the batch statistics; later steps blend them into the
        # running statistics, and normalise with the blend.
        batch_mean = jnp.mean(x, axis=(0, 2))
        batch_var = jnp.mean((x - batch_mean[None, :, None]) ** 2, axis=(0, 2))
        mean = (1 - momentum) * batch_mean + momentum * running_mean
        var = (1 - momentum) * batch_var + momentum * running_var
        mean = jnp.where(first_time, batch_mean, mean)
        var = jnp.where(first_time, batch_var, var)
        out = (x - mean[None, :, None]) / jnp.sqrt(var[None, :, None] + 1e-5)
        return out, (mean, var)

    layer, state = make("ema", momentum=momentum)
    running = (jnp.zeros(3), jnp.zeros(3))
    weights = jnp.arange(5.0)[None, None, :]
    for seed in range(4):
        x = jnp.asarray(normal(seed, (8, 3, 5), loc=seed, scale=1 + seed))

        def loss_new(x, state=state):
            out, new_state = run(layer, x, state)
            return jnp.sum(out**2 * weights), (out, new_state)

        def loss_old(x, running=running, first=seed == 0):
            out, stats = legacy(x, first, *running)
            return jnp.sum(out**2 * weights), (out, stats)

        grad_new, (out_new, state) = jax.grad(loss_new, has_aux=True)(x)
        grad_old, (out_old, running) = jax.grad(loss_old, has_aux=True)(x)
        np.testing.assert_allclose(out_new, out_old, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_new, grad_old, rtol=1e-4, atol=1e-4)
        assert layer.ema_state_index is not None
        for new, old in zip(state.get(layer.ema_state_index), running):
            np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("approach", ("ema", "mode=batch", "batch"))
def test_equinox_0_13_8_checkpoints_load(approach):
    """Checkpoints written by stock equinox 0.13.8 (`tests/data/`, by the script
    beside them: momentum 0.9, three steps) load. With `mode=` they infer as 0.13.8
    meant to: `"ema"` exactly as 0.13.8 did; `mode="batch"` with the exactly debiased
    average of the biased batch variances 0.13.8 accumulated (0.13.8 itself added
    m^k / (1 - m^k) to the variance). `approach="batch"` reads 0.13's stored values
    as its running averages, as documented: off by m^k (0, 1) - m^k x̄."""
    mode = "ema" if approach == "ema" else "batch"
    like = make(approach, channels=4, momentum=0.9)
    layer, state = eqx.tree_deserialise_leaves(DATA / f"bn_0_13_8_{mode}.eqx", like)
    probe = np.load(DATA / "bn_0_13_8_probe.npy")
    out, _ = run(layer, probe, state, inference=True)
    stock = np.load(DATA / f"bn_0_13_8_{mode}_inference.npy")
    if approach == "ema":
        np.testing.assert_allclose(out, stock, rtol=1e-6, atol=1e-6)
        return
    inputs = list(np.load(DATA / "bn_0_13_8_inputs.npy"))
    mean, var = inference_stats("ema_debiased", inputs, 0.9)  # biased variances
    if approach == "batch":
        decay = 0.9 ** len(inputs)
        mean, var = (1 - decay) * mean, (1 - decay) * var + decay
    weight = np.array([1.0, 2.0, 0.5, 1.5])[None, :, None]
    bias = np.array([0.0, 1.0, -1.0, 2.0])[None, :, None]
    expected = normalise(probe, mean, var, 1e-5) * weight + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(stock, expected, rtol=1e-2)  # stock differs from both


@pytest.mark.parametrize("approach", APPROACHES)
def test_serialisation_round_trip_continues_training(approach, tmp_path):
    layer, state = make(approach)
    step = jax.jit(lambda x, state: run(layer, x, state))
    xs = [normal(seed, (8, 3, 2)) for seed in range(4)]
    for x in xs[:2]:
        _, state = step(x, state)
    eqx.tree_serialise_leaves(tmp_path / "bn.eqx", (layer, state))
    loaded, loaded_state = eqx.tree_deserialise_leaves(
        tmp_path / "bn.eqx", make(approach)
    )
    loaded_step = jax.jit(lambda x, state: run(loaded, x, state))
    for x in xs[2:]:
        out, state = step(x, state)
        loaded_out, loaded_state = loaded_step(x, loaded_state)
        np.testing.assert_array_equal(out, loaded_out)
    assert eqx.tree_equal(state, loaded_state)


def test_works_in_sequential_with_jit_grad_and_inference_mode(getkey):
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [
            eqx.nn.Linear(2, 4, key=getkey()),
            eqx.nn.BatchNorm(4, "batch", approach="batch"),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(4, 1, key=getkey()),
        ]
    )

    @eqx.filter_jit
    def loss(model, state, x):
        out, state = run(model, x, state)
        return jnp.mean(out**2), state

    x = normal(3, (16, 2))
    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, state, x
    )
    assert bool(jnp.isfinite(value))
    assert grads[1].weight is not None and bool(jnp.any(grads[1].weight != 0))
    out, same_state = run(model, x, state, inference=True)
    assert out.shape == (16, 1)
    assert eqx.tree_equal(same_state, state)


@pytest.mark.parametrize("approach", APPROACHES)
def test_two_named_axes_equal_one_axis_on_the_flattened_batch(approach):
    layer2, state = make(approach, axis_name=("outer", "inner"))
    layer1 = eqx.tree_at(lambda m: m.axis_name, layer2, "batch")
    nested = jax.vmap(
        lambda x, s: run(layer2, x, s, axis_name="inner"),
        axis_name="outer",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    state1 = state2 = state
    for seed in range(3):
        x = normal(seed, (4, 5, 3, 2), loc=seed, scale=2.0)
        out2, state2 = nested(x, state2)
        out1, state1 = run(layer1, x.reshape(20, 3, 2), state1)
        np.testing.assert_allclose(out2.reshape(20, 3, 2), out1, rtol=1e-5, atol=1e-5)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda a, b: np.allclose(a, b, rtol=1e-6, atol=1e-6), state1, state2
        )
    )


def test_complex_inputs_normalise_with_a_real_variance():
    layer, state = make("batch", dtype=jnp.complex64)
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(8, 3, 2)) + 1j * rng.normal(size=(8, 3, 2))).astype(
        np.complex64
    )
    out, state = run(layer, x, state)
    assert out.dtype == jnp.complex64
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = (np.abs(x - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(
        out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5
    )


# Multi-device tests. They use the devices this process has: upstream's conftest gives
# 2 CPU devices, this repository's gives 8.


def devices():
    if jax.device_count() < 2:
        pytest.skip(
            "needs at least 2 devices: set `jax.config.update('jax_num_cpu_devices', "
            "8)` before JAX starts"
        )
    return jax.devices()


def assert_trees_close(actual, expected, rtol):
    """Leafwise closeness, with an absolute tolerance relative to each leaf's scale
    (a batch-normalised layer's bias gradient is analytically ~0)."""
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(actual), leaves(expected), strict=True):
        b = np.asarray(b)
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol * scale)


def training_step(layer, state, x, cotangent):
    """Output, new state, and the gradients of `sum(cotangent * output)` with respect
    to the layer's parameters and the input."""

    def loss(layer_and_x, state):
        layer, x = layer_and_x
        out, state = run(layer, x, state)
        return jnp.sum(cotangent * out), (out, state)

    grads, (out, state) = eqx.filter_grad(loss, has_aux=True)((layer, x), state)
    return out, state, grads


@pytest.mark.parametrize("approach", APPROACHES)
def test_jit_with_a_sharded_batch_equals_one_device(approach):
    """Data parallelism as most users write it: `jax.jit`, the batch sharded over a
    `Mesh` by a `NamedSharding`, and the layer under a plain `vmap`. Outputs, state and
    gradients equal one device's on the whole batch, step after step."""
    mesh = Mesh(devices(), ("devices",))
    layer, state = make(approach, channels=3)
    step = eqx.filter_jit(training_step)
    one_state = many_state = state
    for seed in range(3):
        x = normal(seed, (4 * len(mesh.devices), 3, 5), loc=seed, scale=1.0 + seed)
        cotangent = normal(seed + 10, x.shape)
        sharded = jax.device_put(x, NamedSharding(mesh, P("devices")))
        one = step(layer, one_state, x, cotangent)
        many = step(layer, many_state, sharded, cotangent)
        assert many[0].sharding.spec == P("devices")
        assert_trees_close(many, one, rtol=1e-5)
        one_state, many_state = one[1], many[1]


@pytest.mark.parametrize("approach", APPROACHES)
def test_shard_map_equals_one_device(approach):
    """`jax.shard_map` over the devices, with the `vmap` axis inside it named too.
    `check_vma=False`: JAX's varying-axes check rejects a collective over both a mesh
    axis and a `vmap` axis ("jax.lax.psum can only accept axis_name which corresponds
    to one of varying, unreduced, reduced or invarying state of the input")."""
    mesh = Mesh(devices(), ("devices",))
    layer, state = make(approach, axis_name=("devices", "batch"))
    single = jax.jit(
        lambda x, s: run(eqx.tree_at(lambda m: m.axis_name, layer, "batch"), x, s)
    )
    sharded = jax.jit(
        jax.shard_map(
            lambda x, s: run(layer, x, s),
            mesh=mesh,
            in_specs=(P("devices"), P()),
            out_specs=(P("devices"), P()),
            check_vma=False,
        )
    )
    one_state = many_state = state
    for seed in range(3):
        x = normal(seed, (4 * len(mesh.devices), 3, 4), loc=seed, scale=1.0 + seed)
        one = single(x, one_state)
        many = sharded(x, many_state)
        assert_trees_close(many, one, rtol=1e-5)
        one_state, many_state = one[1], many[1]


@pytest.mark.parametrize("approach", APPROACHES)
def test_pmap_equals_one_device(approach):
    count = len(devices())
    layer, state = make(approach, axis_name=("devices", "batch"))
    single = eqx.tree_at(lambda m: m.axis_name, layer, "batch")
    pmapped = jax.pmap(
        lambda x, s: run(layer, x, s),
        axis_name="devices",
        in_axes=(0, None),
        out_axes=(0, None),
    )
    one_state = many_state = state
    for seed in range(2):
        x = normal(seed, (4 * count, 3, 4), loc=seed, scale=1.0 + seed)
        out, one_state = run(single, x, one_state)
        many, many_state = pmapped(x.reshape(count, 4, 3, 4), many_state)
        assert_trees_close((many.reshape(x.shape), many_state), (out, one_state), 1e-5)


# `BatchNorm.recompute_statistics`.


class Net(eqx.Module):
    """Nested stateful layers: a `Sequential` holding two `BatchNorm`s around a
    `SpectralNorm`, whose own state must not change."""

    layers: eqx.nn.Sequential

    def __init__(self, approach, key):
        keys = jax.random.split(key, 3)
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.BatchNorm(3, "batch", approach=approach),
                eqx.nn.SpectralNorm(
                    eqx.nn.Linear(3, 4, key=keys[0]), "weight", key=keys[1]
                ),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.BatchNorm(4, "batch", approach=approach),
            ]
        )

    def __call__(self, x, state):
        return self.layers(x, state)


def forward(model, state, x):
    return run(model, x, state)


@pytest.mark.parametrize("approach", APPROACHES)
def test_recompute_twice_changes_nothing_and_leaves_other_state_alone(approach, getkey):
    model, state = eqx.nn.make_with_state(Net)(approach, getkey())
    for seed in range(3):  # some training, so that every entry has moved
        _, state = run(model, normal(seed, (16, 3), loc=2.0), state)
    spectral = model.layers[1]
    before = state.get(spectral.uv_index)
    batches = normal(7, (5, 16, 3), loc=-1.0, scale=3.0)
    recompute = eqx.filter_jit(eqx.nn.BatchNorm.recompute_statistics)
    once = recompute(forward, model, state, batches)
    twice = recompute(forward, model, once, batches)
    for a, b in zip(before, once.get(spectral.uv_index)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), once, twice)
    )
    for norm in (model.layers[0], model.layers[3]):
        assert not eqx.tree_equal(
            once.get(norm._indices()[1]), state.get(norm._indices()[1])
        )


def test_recompute_on_sharded_batches_equals_one_device(getkey):
    mesh = Mesh(devices(), ("devices",))
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())
    batches = normal(8, (4, 4 * len(mesh.devices), 3), loc=1.0, scale=2.0)
    sharded = jax.device_put(batches, NamedSharding(mesh, P(None, "devices")))
    recompute = eqx.filter_jit(eqx.nn.BatchNorm.recompute_statistics)
    one = recompute(forward, model, state, batches)
    many = recompute(forward, model, state, sharded)
    assert_trees_close(many, one, rtol=1e-5)


def test_recompute_explains_misuse(getkey):
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())
    batches = normal(0, (2, 8, 3))
    with pytest.raises(ValueError, match="no `BatchNorm`"):
        eqx.nn.BatchNorm.recompute_statistics(
            forward, eqx.nn.Identity(), eqx.nn.State(eqx.nn.Identity()), batches
        )
    frozen = eqx.nn.inference_mode(model)
    with pytest.raises(ValueError, match="did not update"):
        eqx.nn.BatchNorm.recompute_statistics(
            lambda _, s, x: forward(frozen, s, x), model, state, batches
        )
