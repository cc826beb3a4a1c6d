import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


def _train(bn, *axis_names):
    """`bn` over a batch with one leading axis per name, the outermost first."""
    for axis_name in reversed(axis_names or ("batch",)):
        bn = jax.vmap(bn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))
    return bn


def _infer(bn, *axis_names):
    return _train(eqx.nn.inference_mode(bn), *axis_names)


def _channels_data(key, shape, loc=0.0):
    """Normal data of `shape` (batch, channels, ...) with a different scale per
    channel."""
    scale = jnp.arange(1, shape[1] + 1, dtype=jnp.float32)
    scale = scale.reshape((1, shape[1]) + (1,) * (len(shape) - 2))
    return loc + scale * jr.normal(key, shape)


# https://github.com/patrick-kidger/equinox/issues/955
@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm_inference_before_training_uses_unit_statistics(getkey, mode):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)
    x = _channels_data(getkey(), (4, 3), loc=5.0)
    out, _ = _infer(bn)(x, state)
    assert jnp.allclose(out, x / jnp.sqrt(1 + bn.eps))


@pytest.mark.parametrize("momentum", (0.5, 0.9, 0.99))
@pytest.mark.parametrize("steps", (1, 2, 10))
def test_batch_norm_batch_mode_infers_with_the_unbiased_batch_statistics(
    getkey, momentum, steps
):
    # After any number of steps on one batch, the debiased running statistics are
    # that batch's mean and unbiased variance, over the batch and spatial axes.
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", momentum=momentum, mode="batch"
    )
    x = _channels_data(getkey(), (8, 3, 5), loc=2.0)
    train = eqx.filter_jit(_train(bn))
    for _ in range(steps):
        _, state = train(x, state)
    out, _ = _infer(bn)(x, state)
    mean = jnp.mean(x, axis=(0, 2), keepdims=True)
    var = jnp.var(x, axis=(0, 2), keepdims=True, ddof=1)
    expected = (x - mean) / jnp.sqrt(var + bn.eps)
    assert jnp.allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_batch_mode_keeps_the_0_13_state_encoding(getkey):
    # The hidden statistics are m^k (0, 1) + (1 - m^k) (the debiased averages), so
    # that states saved by earlier versions are read correctly.
    momentum = 0.9
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", momentum=momentum, mode="batch"
    )
    x = _channels_data(getkey(), (6, 3))
    _, state = _train(bn)(x, state)
    assert bn.batch_state_index is not None
    hidden_mean, hidden_var = state.get(bn.batch_state_index)
    var = jnp.var(x, axis=0, ddof=1)
    assert jnp.allclose(hidden_mean, (1 - momentum) * jnp.mean(x, axis=0))
    assert jnp.allclose(hidden_var, momentum + (1 - momentum) * var)


def test_batch_norm_batch_mode_averages_over_all_named_axes_and_steps(getkey):
    momentum = 0.8
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        2, ("outer", "inner"), momentum=momentum, mode="batch"
    )
    xs = [_channels_data(getkey(), (2, 3, 2, 4), loc=i) for i in range(3)]
    for x in xs:
        _, state = _train(bn, "outer", "inner")(x, state)
    # Per channel, n = 2 * 3 * 4 values a batch; batch j of k has weight
    # (1 - m) m^(k - j) / (1 - m^k).
    values = np.stack([np.asarray(x, np.float64) for x in xs]).transpose(0, 3, 1, 2, 4)
    values = values.reshape(3, 2, -1)
    weights = (1 - momentum) * momentum ** np.arange(2, -1, -1) / (1 - momentum**3)
    mean = weights @ values.mean(axis=2)
    var = weights @ values.var(axis=2, ddof=1)
    out, _ = _infer(bn, "outer", "inner")(xs[0], state)
    shape = (1, 1, 2, 1)
    expected = (xs[0] - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + bn.eps)
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", (jnp.float16, jnp.bfloat16))
@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm_half_precision_computes_statistics_in_float32(getkey, mode, dtype):
    # The sum over this batch overflows float16.
    x = _channels_data(getkey(), (64, 3), loc=2000.0).astype(dtype)
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)
    out, half_state = _train(bn)(x, state)
    expected, full_state = _train(bn)(x.astype(jnp.float32), state)
    assert out.dtype == dtype
    tol = 2 * float(jnp.finfo(dtype).eps)
    assert jnp.allclose(out.astype(jnp.float32), expected, rtol=tol, atol=tol)
    for half, full in zip(jax.tree.leaves(half_state), jax.tree.leaves(full_state)):
        assert half.dtype == full.dtype
        assert jnp.array_equal(half, full)
    out, _ = _infer(bn)(x, half_state)
    assert out.dtype == dtype
    assert jnp.all(jnp.isfinite(out))


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm_integer_inputs_give_floating_outputs(mode):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)
    x = jnp.arange(12).reshape(4, 3)
    out, _ = _train(bn)(x, state)
    expected, _ = _train(bn)(x.astype(jnp.float32), state)
    assert out.dtype == expected.dtype == jnp.float32
    assert jnp.allclose(out, expected)


def test_batch_norm_wrong_number_of_channels_is_a_value_error():
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    with pytest.raises(ValueError, match="input_size=3"):
        _train(bn)(jnp.zeros((4, 5)), state)


@pytest.mark.parametrize("mode", ("ema", "batch"))
def test_batch_norm_computes_no_nan(getkey, mode):
    # Not even in a branch that `jnp.where` discards: before the first step, and
    # with a single value per channel.
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)
    x = _channels_data(getkey(), (5, 3))
    with jax.debug_nans(True):
        out, state = _infer(bn)(x, state)
        out, state = _train(bn)(x[:1], state)
        assert jnp.all(out == 0)
        out, state = _infer(bn)(x, state)
        assert jnp.all(jnp.isfinite(out))
        for leaf in jax.tree.leaves(state):
            assert jnp.all(jnp.isfinite(leaf))
