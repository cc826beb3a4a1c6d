"""Cross-checks of `eqx.nn.BatchNorm(approach=...)` against Flax and Haiku, where their
semantics coincide: property tests, as in `test_batch_norm_properties.py`, whose
example strategies they share.

Upstream's test environment has neither library, so the pull request leaves this file
out (`NOT_COPIED` in `scripts/export-to-upstream`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from .batch_norm_reference import make, moments, run
from .test_batch_norm_properties import batches, momenta


@given(xs=batches(count=3), momentum=momenta)
def test_batch_training_output_equals_flax(xs, momentum):
    """ "batch"'s training output equals Flax linen's
    `BatchNorm(use_running_average=False, use_fast_variance=False)`."""
    flax_nn = pytest.importorskip("flax.linen")
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


@given(xs=batches(count=4), momentum=momenta)
def test_debiased_running_mean_equals_haiku_ema(xs, momentum):
    """ "ema_debiased"'s inference mean equals the average kept by Haiku's
    `ExponentialMovingAverage(zero_debias=True)` of the batch means."""
    hk = pytest.importorskip("haiku")
    ema = hk.transform_with_state(
        lambda value: hk.ExponentialMovingAverage(momentum, zero_debias=True)(value)
    )
    channels = xs[0].shape[1]
    _, ema_state = ema.init(None, jnp.zeros(channels, jnp.float32))
    layer, state = make("ema_debiased", channels, momentum=momentum, eps=0.0)
    expected = None
    for x in xs:
        mean = jnp.asarray(moments(x)[0], jnp.float32)
        expected, ema_state = ema.apply({}, ema_state, None, mean)
        _, state = run(layer, x, state)
    # With eps=0 and no affine, inference is (x - mean) * inv_std: inputs of all 0
    # and all 1 give inv_std = out(1) - out(0) and mean = -out(0) / inv_std.
    zeros = np.zeros_like(xs[0])
    zero_out = np.asarray(run(layer, zeros, state, inference=True)[0])
    one_out = np.asarray(run(layer, zeros + 1, state, inference=True)[0])
    first = (0, slice(None)) + (0,) * (zeros.ndim - 2)
    used_mean = -zero_out[first] / (one_out[first] - zero_out[first])
    assert expected is not None
    np.testing.assert_allclose(used_mean, expected, rtol=1e-4, atol=1e-4)
