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
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .batch_norm_reference import (
    APPROACHES,
    inference_stats,
    make,
    normalise,
    pooled_statistics,
    run,
    training_output,
    UNBIASED,
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
    assert "recompute_batch_norm_statistics" in message
    assert "batch_norm_approaches" in message
    assert layer.approach == "ema" and layer.mode == "ema" and layer.momentum == 0.99


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_mode_is_a_silent_spelling_with_the_0_13_layout(mode):
    """`mode="ema" | "batch"` do not warn, keep `bn.mode` as in 0.13.8, and have the
    state layout of the same approach; `approach=` layers have `mode=None`."""
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


def test_positional_arguments_keep_0_13_order():
    layer = eqx.nn.BatchNorm(4, "b", 0.1, False, 0.5, True, jnp.float32, "batch")
    assert layer.mode == "batch"
    assert (layer.input_size, layer.axis_name, layer.eps) == (4, "b", 0.1)
    assert (layer.channelwise_affine, layer.momentum) == (False, 0.5)
    assert layer.inference is True and layer.approach == "batch"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(mode="batch", approach="batch"), ["only one", "drop `mode`"]),
        (dict(approach="batch", momentum=0.0), ["momentum", "between 0 and 1"]),
        (dict(approach="batch", momentum=1.0), ["momentum", "0.9"]),
        (dict(approach="batch", momentum=1 - 1e-9), ["momentum", "float32"]),
        (dict(approach="batch", momentum=1e-50), ["momentum", "float32"]),
        (dict(approach="batch", eps=-1e-5), ["eps", "non-negative"]),
        (dict(approach="batch", eps=float("nan")), ["eps", "non-negative"]),
        (dict(approach="batch", r_max=2.0), ["r_max", "batch_renorm", "Remove"]),
        (dict(approach="ema", d_max=2.0), ["d_max", "batch_renorm"]),
        (dict(approach="batch", warmup=10), ["warmup", "ema_smooth_start"]),
        (dict(approach="batch_renorm", r_max=0.5), ["r_max", "at least 1"]),
        (dict(approach="batch_renorm", d_max=-1.0), ["d_max", "at least 0"]),
        (dict(approach="ema_smooth_start", warmup=-3), ["warmup", "at least 0"]),
        (dict(approach="batch_renorm", warmup=2**31), ["warmup", "below 2147483648"]),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as error:
        eqx.nn.BatchNorm(3, "batch", **kwargs)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("approach", ["batch_renorm", "ema_smooth_start"])
def test_the_longest_warmup_trains(approach):
    """`warmup=2**31 - 1`, the most steps the counter can reach, is accepted, and the
    warm-up starts as it does for any `warmup`."""
    layer, state = make(approach, warmup=2**31 - 1)
    batches = [normal(seed, (8, 3)) for seed in range(3)]
    for k in range(1, len(batches) + 1):
        out, state = run(layer, batches[k - 1], state)
        expected = training_output(
            approach, batches[:k], layer.momentum, 1e-5, warmup=2**31 - 1
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_size=0),
        dict(input_size=-2),
        dict(input_size=2.0),
        dict(input_size="3"),
        dict(momentum="0.9"),
        dict(eps="1e-5"),
        dict(approach="batch_renorm", r_max=True),
        dict(approach="ema_smooth_start", warmup=2.5),
        dict(approach="batchnorm"),
        dict(approach=None, mode="bat"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused_naming_the_argument(kwargs):
    """A `ValueError` from the layer, or a `TypeError` from a runtime type-checker
    (as under upstream's test settings): either way naming the argument and, for the
    strings, the valid choices."""
    arguments = dict(input_size=3, approach="batch") | kwargs
    with pytest.raises((ValueError, TypeError)) as error:
        eqx.nn.BatchNorm(axis_name="batch", **arguments)
    name = [k for k, v in kwargs.items() if v is not None and v != "batchnorm"]
    name = name[0] if name else "approach"
    assert name in str(error.value)
    if name in ("approach", "mode"):
        assert "'ema_smooth_start'" in str(error.value) or "'legacy'" in str(
            error.value
        )


def test_numpy_numbers_and_0d_arrays_are_numbers():
    layer = eqx.nn.BatchNorm(
        np.array(3),
        "batch",
        eps=np.float64(1e-3),
        momentum=np.float64(0.5),
        approach="batch_renorm",
        warmup=np.int64(5),
    )
    assert (layer.input_size, layer.eps, layer.warmup, layer.momentum) == (
        3,
        1e-3,
        5,
        0.5,
    )
    assert type(layer.input_size) is int and type(layer.warmup) is int
    assert type(layer.momentum) is float
    for bad in (np.array(3.0), np.array([3]), np.array(True)):
        with pytest.raises(ValueError, match="input_size"):
            eqx.nn.BatchNorm(bad, "batch", approach="batch")
    with pytest.raises(ValueError, match="input_size"):  # a traced value is not static
        jax.jit(lambda n: eqx.nn.BatchNorm(n, "batch", approach="batch").weight)(3)


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
def test_one_value_per_channel_is_refused_in_training(approach):
    """For `approach=`, a training batch of one example without spatial axes has no
    variance: a clear error at trace time (as PyTorch). Inference accepts it."""
    layer, state = make(approach)
    with pytest.raises(ValueError, match="one value per channel"):
        jax.eval_shape(lambda x: run(layer, x, state), jnp.zeros((1, 3)))
    out, _ = run(layer, jnp.ones((1, 3)), state, inference=True)
    assert out.shape == (1, 3)


@pytest.mark.parametrize("approach", ("ema", "mode=batch"))
def test_single_value_per_channel_stays_finite_with_mode(approach):
    """With `mode=` (as in 0.13.8, whose tests differentiate through a batch of one),
    one example without spatial dimensions gives a finite state and gradient, and
    outputs the bias."""
    if approach == "ema":
        layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema")
    else:
        layer, state = make(approach)
    layer = eqx.tree_at(lambda m: m.bias, layer, jnp.array([1.0, 2.0, 3.0]))

    def loss(x):
        out, new_state = run(layer, x, state)
        return jnp.sum(out), (out, new_state)

    grad, (out, new_state) = jax.grad(loss, has_aux=True)(jnp.array([[0.3, -2, 7]]))
    assert bool(jnp.all(jnp.isfinite(grad)))
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
    # A list of names (upstream's `test_batch_norm` passes a tuple).
    layer2, state = make(approach, axis_name=["outer", "inner"])
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


@pytest.mark.parametrize("approach", APPROACHES + ("mode=batch",))
def test_eager_training_steps_compile_once(approach):
    """Called without `jit`, a training step compiles on its first call only: later
    steps of the same shapes reuse every compiled operation, the `lax.cond` included."""
    compiled = []

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    layer, state = make(approach)
    _, state = run(layer, normal(0, (8, 3)), state)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda v: v + 1)(jnp.zeros(2))  # a new function: it compiles
        assert compiled, "the listener does not see compilations"
        compiled.clear()
        for seed in (1, 2):
            _, state = run(layer, normal(seed, (8, 3), loc=seed), state)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []


@pytest.mark.parametrize("approach", APPROACHES + ("mode=batch",))
def test_complex_training_needs_complex_running_averages(approach):
    """A complex batch would lose the imaginary part of its mean in real running
    averages, and Batch Renormalization's clipping is defined for real values: both
    are refused, in training and in recomputation. Inference is not refused."""
    x = (normal(0, (8, 3)) + 1j * normal(1, (8, 3))).astype(np.complex64)
    layer, state = make(approach)
    with pytest.raises(ValueError, match="complex64"):
        run(layer, x, state)
    with pytest.raises(ValueError, match="complex64"):
        recompute(forward, layer, state, [x])
    assert run(layer, x, state, inference=True)[0].dtype == jnp.complex64
    layer, state = make(approach, dtype=jnp.complex64)
    if approach == "batch_renorm":
        with pytest.raises(ValueError, match="batch_renorm"):
            run(layer, x, state)
    else:  # with complex running averages, it trains
        assert run(layer, x, state)[0].dtype == jnp.complex64


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


# Multi-device tests. They use the devices this process has, at least 2.


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


# The collectives do not depend on the approach: "batch_renorm" uses both the batch
# statistics and the running averages, and "mode=batch" 0.13's encoding.
MULTI_DEVICE = ("batch_renorm", "mode=batch")


@pytest.mark.parametrize("approach", MULTI_DEVICE)
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


def shard_mapped(layer, mesh, masked):
    """`layer` under `jax.shard_map` over the devices, with the `vmap` axis inside it
    named too. `check_vma=False`: JAX's varying-axes check rejects a collective over
    both a mesh axis and a `vmap` axis."""
    specs = (P("devices"), P(), P("devices"))
    return jax.jit(
        jax.shard_map(
            lambda x, s, mask: run(layer, x, s, mask=mask if masked else None),
            mesh=mesh,
            in_specs=specs,
            out_specs=(P("devices"), P()),
            check_vma=False,
        )
    )


def pmapped(layer, count, masked):
    return lambda x, s, mask: jax.pmap(
        lambda x, s, mask: run(layer, x, s, mask=mask if masked else None),
        axis_name="devices",
        in_axes=(0, None, 0),
        out_axes=(0, None),
    )(
        x.reshape(count, -1, *x.shape[1:]),
        s,
        mask.reshape(count, -1, *mask.shape[1:]),
    )


@pytest.mark.parametrize("approach", MULTI_DEVICE)
@pytest.mark.parametrize("transform", ("shard_map", "pmap"))
def test_per_device_reductions_equal_one_device(approach, transform):
    """Under `shard_map` and `pmap`, where each device reduces its own shard, outputs
    and state equal one device's on the whole batch."""
    count = len(devices())
    mesh = Mesh(devices(), ("devices",))
    layer, state = make(approach, axis_name=("devices", "batch"))
    single = eqx.tree_at(lambda m: m.axis_name, layer, "batch")
    if transform == "shard_map":
        many_devices = shard_mapped(layer, mesh, masked=False)
    else:
        many_devices = pmapped(layer, count, masked=False)
    one_state = many_state = state
    for seed in range(3):
        x = normal(seed, (4 * count, 3, 4), loc=seed, scale=1.0 + seed)
        out, one_state = run(single, x, one_state)
        many, many_state = many_devices(x, many_state, np.ones(len(x), bool))
        assert_trees_close((many.reshape(x.shape), many_state), (out, one_state), 1e-5)


def padded(x, valid, garbage=np.nan):
    """`x` with the examples where `valid` is false replaced by `garbage`."""
    return np.where(np.reshape(valid, (-1,) + (1,) * (x.ndim - 1)), x, garbage)


@pytest.mark.parametrize("transform", ("jit", "shard_map", "pmap"))
def test_nan_padded_batches_on_many_devices_equal_the_real_data_on_one(transform):
    """Whole examples masked out, unevenly across devices (the first device holds only
    padding, filled with NaN): outputs at valid positions, the state and the
    gradients equal one device's run on the real examples alone, step after step."""
    count = len(devices())
    mesh = Mesh(devices(), ("devices",))
    names = "batch" if transform == "jit" else ("devices", "batch")
    layer, state = make("batch_renorm", axis_name=names, warmup=0)
    single = eqx.tree_at(lambda m: m.axis_name, layer, "batch")

    def loss(layer, x, state, mask, cotangent, call):
        out, state = call(layer, x, state, mask)
        return jnp.sum(jnp.where(mask[:, None, None], cotangent * out, 0)), (out, state)

    def sharded_call(layer, x, state, mask):
        if transform == "shard_map":
            return shard_mapped(layer, mesh, masked=True)(x, state, mask)
        if transform == "pmap":
            out, state = pmapped(layer, count, masked=True)(x, state, mask)
            return out.reshape(x.shape), state
        return run(layer, x, state, mask=mask)

    grad = eqx.filter_grad(loss, has_aux=True)
    rng = np.random.default_rng(0)
    one_state = many_state = state
    for seed in range(3):
        per_device = 4
        mask = rng.random(per_device * count) < 0.6
        mask[:per_device] = False  # the first device holds only padding
        mask[per_device] = True
        x = normal(seed, (per_device * count, 3, 5), loc=seed, scale=1.0 + seed)
        cotangent = normal(seed + 10, x.shape)
        garbage = padded(x, mask)
        if transform == "jit":
            garbage = jax.device_put(garbage, NamedSharding(mesh, P("devices")))
        grads_many, (out_many, many_state) = grad(
            layer, garbage, many_state, mask, cotangent, sharded_call
        )
        grads_one, (out_one, one_state) = grad(
            single,
            x[mask],
            one_state,
            np.ones(mask.sum(), bool),
            cotangent[mask],
            lambda layer, x, state, mask: run(layer, x, state),
        )
        assert_trees_close(
            (
                np.asarray(out_many)[mask],
                many_state,
                grads_many.weight,
                grads_many.bias,
            ),
            (out_one, one_state, grads_one.weight, grads_one.bias),
            rtol=1e-5,
        )
        np.testing.assert_array_equal(np.asarray(out_many)[~mask], 0)


@pytest.mark.parametrize("approach", APPROACHES + ("mode=batch",))
def test_a_batch_without_valid_values_changes_nothing_even_with_nan_padding(approach):
    """A training step whose mask is false everywhere leaves the state exactly as it
    was, and outputs zeros, with NaN in the padding."""
    layer, state = make(approach)
    _, state = run(layer, normal(0, (8, 3, 2)), state)
    x = np.full((8, 3, 2), np.nan, np.float32)
    out, new_state = run(layer, x, state, mask=np.zeros((8, 2), bool))
    np.testing.assert_array_equal(out, 0)
    assert eqx.tree_equal(new_state, state)


def test_bad_masks_are_refused_at_trace_time():
    layer, state = make("batch")
    x = jnp.zeros((4, 3, 5))
    # An integer mask is a `TypeError` under a runtime type-checker.
    for mask in (jnp.ones((4, 5), jnp.int32), jnp.ones((4, 2), bool)):
        with pytest.raises((ValueError, TypeError), match="mask"):
            jax.eval_shape(lambda x, mask: run(layer, x, state, mask=mask), x, mask)
    mask = jnp.ones((4, 3, 5), bool)  # with the channel axis
    with pytest.raises(ValueError, match="without its channel axis"):
        jax.eval_shape(lambda x, mask: run(layer, x, state, mask=mask), x, mask)


def full_size_selects(fn, *args) -> int:
    """The `select_n`s in `fn`'s jaxpr, sub-jaxprs included, whose output has the
    shape of the first argument."""
    shape = jnp.shape(args[0])

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "select_n":
                total += eqn.outvars[0].aval.shape == shape
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple) else (param,):
                    if isinstance(sub, ClosedJaxpr):
                        total += count(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("approach", APPROACHES + ("mode=batch",))
def test_without_a_mask_no_value_is_selected(approach):
    """`mask=None` adds no masking to the computation: training and inference, forward
    and backward, select no full-size values (and with a mask, they do)."""
    layer, state = make(approach)
    x, mask = jnp.ones((4, 3, 5)), jnp.ones((4, 5), bool)

    def loss(x, mask, inference):
        return jnp.sum(run(layer, x, state, inference, mask=mask)[0])

    for inference in (False, True):
        step = jax.value_and_grad(loss)
        assert full_size_selects(lambda x: step(x, None, inference), x) == 0
        assert full_size_selects(lambda x: step(x, mask, inference), x) > 0


# `eqx.nn.recompute_batch_norm_statistics`.


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


recompute = eqx.nn.recompute_batch_norm_statistics


@pytest.mark.parametrize("approach", APPROACHES)
def test_recompute_twice_changes_nothing_and_leaves_other_state_alone(approach, getkey):
    model, state = eqx.nn.make_with_state(Net)(approach, getkey())
    for seed in range(3):  # some training, so that every entry has moved
        _, state = run(model, normal(seed, (16, 3), loc=2.0), state)
    spectral = model.layers[1]
    before = state.get(spectral.uv_index)
    batches = normal(7, (5, 16, 3), loc=-1.0, scale=3.0)
    once = recompute(forward, model, state, batches)
    twice = recompute(forward, model, once, batches)
    for a, b in zip(before, once.get(spectral.uv_index)):
        np.testing.assert_array_equal(a, b)
    assert eqx.tree_equal(once, twice)
    for norm in (model.layers[0], model.layers[3]):
        assert not eqx.tree_equal(once.substate(norm), state.substate(norm))


def test_recompute_on_sharded_batches_equals_one_device(getkey):
    mesh = Mesh(devices(), ("devices",))
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())
    batches = normal(8, (4, 4 * len(mesh.devices), 3), loc=1.0, scale=2.0)
    sharded = jax.device_put(batches, NamedSharding(mesh, P(None, "devices")))
    one = recompute(forward, model, state, batches)
    many = recompute(forward, model, state, sharded)
    assert_trees_close(many, one, rtol=1e-5)


def test_recompute_accepts_any_forward_that_trains(getkey):
    """A `forward` that closes over `state` inside its `vmap` trains, and so it also
    recomputes (0.13's "old state" check must not fire)."""
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())

    def closing(model, state, x):
        return jax.vmap(
            lambda x: model(x, state), axis_name="batch", out_axes=(0, None)
        )(x)

    batches = normal(1, (3, 8, 3))
    copy = jax.tree_util.tree_map(lambda x: x, state)  # `State.set` spends its input
    _, trained = closing(model, copy, batches[0])  # it trains
    assert not eqx.tree_equal(trained, state)
    expected = recompute(forward, model, state, batches)
    assert eqx.tree_equal(recompute(closing, model, state, batches), expected)


def test_recompute_streams_lists_and_generators_like_the_stack(getkey):
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())
    batches = normal(2, (4, 8, 3), loc=1.0, scale=2.0)
    stacked = recompute(forward, model, state, batches)
    listed = recompute(forward, model, state, list(batches))
    generated = recompute(forward, model, state, (b for b in batches))
    assert_trees_close(listed, stacked, rtol=1e-6)
    assert_trees_close(generated, stacked, rtol=1e-6)


def test_recompute_counts_each_call_as_a_batch():
    """A `BatchNorm` called twice per `forward` (on two halves of each batch) gives the
    statistics of four half-batches: the pooled formula, in float64."""
    layer, state = make("batch")

    def twice(model, state, x):
        first, state = run(model, x[:4], state)
        second, state = run(model, x[4:], state)
        return jnp.concatenate([first, second]), state

    batches = normal(3, (2, 8, 3, 2), loc=2.0, scale=3.0)
    state = recompute(twice, layer, state, batches)
    halves = [b[:4] for b in batches] + [b[4:] for b in batches]
    mean, var = pooled_statistics(halves, [None] * 4, unbiased=True)
    probe = normal(4, (5, 3, 2))
    out, _ = run(layer, probe, state, inference=True)
    np.testing.assert_allclose(out, normalise(probe, mean, var, 1e-5), rtol=1e-5)


@pytest.mark.parametrize("approach", APPROACHES + ("mode=batch",))
def test_recompute_is_float32_exact_for_small_activations(approach):
    """At momentum 0.999 and std 1e-3, inference after recomputing uses the pooled
    statistics to float32 precision, for every approach and spelling (0.13's
    `mode="batch"` encoding included)."""
    layer, state = make(approach, momentum=0.999, eps=0.0)
    batches = normal(5, (20, 64, 3), loc=0.01, scale=1e-3)
    state = recompute(forward, layer, state, batches)
    mean, var = pooled_statistics(batches, [None] * 20, approach in UNBIASED)
    probe = normal(6, (4, 3), loc=0.01, scale=1e-3)
    out, _ = run(layer, probe, state, inference=True)
    expected = normalise(probe, mean, var, 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_recompute_explains_misuse(getkey):
    model, state = eqx.nn.make_with_state(Net)("batch", getkey())
    batches = normal(0, (2, 8, 3))
    with pytest.raises(ValueError, match="no `BatchNorm`"):
        recompute(forward, eqx.nn.Identity(), eqx.nn.State(eqx.nn.Identity()), batches)
    freezing = lambda model, state, x: forward(eqx.nn.inference_mode(model), state, x)
    for call in (freezing, eqx.filter_jit(freezing)):
        with pytest.raises(ValueError, match="inference mode"):
            recompute(call, model, state, batches)
    # A model passed in inference mode (say, to switch dropout off) is fine: its
    # `BatchNorm`s run in training mode. (Its `SpectralNorm` does not, which changes
    # what the second `BatchNorm` sees: compare the first.)
    first = model.layers[0]
    frozen = recompute(forward, eqx.nn.inference_mode(model), state, batches)
    trained = recompute(forward, model, state, batches)
    assert eqx.tree_equal(frozen.substate(first), trained.substate(first))
    with pytest.raises(ValueError, match="did not call"):
        recompute(lambda _, s, x: forward(model, s, x), model, state, batches)
    with pytest.raises(ValueError, match="got no batch"):
        recompute(forward, model, state, [])
    # Only the first `BatchNorm` is called: the error names the other.
    first_only = lambda m, s, x: forward(m.layers[0], s, x)
    with pytest.raises(
        ValueError, match=r"`BatchNorm` at `model\.layers\.layers\[3\]`, or"
    ):
        recompute(first_only, model, state, batches)
    with pytest.raises(ValueError, match="returned the state it was given"):
        recompute(lambda m, s, x: (forward(m, s, x)[0], s), model, state, batches)
    with pytest.raises(
        ValueError, match="PyTree of arrays only, but it holds a `float`"
    ):
        recompute(
            lambda m, s, b: forward(m, s, b["x"]),
            model,
            state,
            {"x": batches, "t": 1.0},
        )
    with pytest.raises(ValueError, match="two or more valid values"):
        recompute(forward, model, state, [batches[0][:1]])
    with pytest.raises(ValueError, match="did not call"):
        recompute(lambda *_: forward(model, state, batches[0]), model, state, batches)
    with pytest.raises(ValueError, match="did not call"):  # the model, not the state
        recompute(lambda m, _, x: forward(m, state, x), model, state, batches)
    with pytest.raises(ValueError, match="outside `jax.jit`"):
        eqx.filter_jit(recompute)(forward, model, state, batches)
    # Traced batches, with the model closed over.
    with pytest.raises(ValueError, match="outside `jax.jit`"):
        jax.jit(lambda b: recompute(forward, model, state, b))(batches)
    with pytest.raises(ValueError, match="same length"):  # 2 batches, 1 mask
        recompute(forward, model, state, (batches, np.ones((1, 8), bool)))
