"""Helpers for the `eqx.nn.BatchNorm` tests.

`make` and `run` build and call the layer as a user would. Everything else is an
independent float64 NumPy reference, written from the formulas in the layer's
docstring as closed forms over the whole sequence of batches (not as the layer's
step-by-step recursion); it never calls the layer. Batches have shape
`(batch, channels, *spatial)`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
# The approaches whose running averages are exactly debiased.
DEBIASED = ("batch", "batch_renorm", "ema_debiased", "ema_smooth_start")
# The spellings whose running variance is unbiased ("mode=batch" is `mode="batch"`).
UNBIASED = ("batch", "batch_renorm", "mode=batch")
EPS32 = float(np.finfo(np.float32).eps)


def batch_norm(approach: Any = "batch", channels=3, axis_name: Any = "batch", **kwargs):
    """A `BatchNorm`; `approach="mode=batch"` spells it `mode="batch"`."""
    if approach == "mode=batch":
        return eqx.nn.BatchNorm(channels, axis_name, mode="batch", **kwargs)
    return eqx.nn.BatchNorm(channels, axis_name, approach=approach, **kwargs)


def make(*args, **kwargs):
    """A `BatchNorm` and its state."""
    return eqx.nn.make_with_state(batch_norm)(*args, **kwargs)


def run(layer, x, state, inference=False, axis_name="batch", mask=None):
    """Calls `layer` on a batch, under `vmap` with the batch axis named; `mask`, if
    given, has one entry per example (its leading axis)."""
    if inference:
        layer = eqx.nn.inference_mode(layer)
    if mask is None:
        call = lambda x, state, mask: layer(x, state)
    else:
        call = lambda x, state, mask: layer(x, state, mask=mask)
    batched = jax.vmap(
        call, axis_name=axis_name, in_axes=(0, None, 0), out_axes=(0, None)
    )
    return batched(jnp.asarray(x), state, None if mask is None else jnp.asarray(mask))


def channel(values, ndim):
    """Per-channel values shaped to broadcast against `(batch, channels, *spatial)`."""
    return np.reshape(values, (1, -1) + (1,) * (ndim - 2))


def valid_values(x, mask=None):
    """Float64 `(channels, n)`: each channel's valid values, with `mask` of shape
    `(batch, *spatial)` or any shape that broadcasts to it."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), 1, 0)
    if mask is None:
        return x.reshape(x.shape[0], -1)
    mask = np.broadcast_to(
        np.reshape(mask, np.shape(mask) + (1,) * (x.ndim - 1 - np.ndim(mask))),
        x.shape[1:],
    )
    return x[:, mask]


def tolerance(momentum, steps, mean=0.0, var=1.0):
    """Float32 tolerance on normalised outputs: about eps of rounding per effective
    step of the running average, amplified by |mean| / std when the mean is
    subtracted."""
    effective = min(steps, 1 / (1 - momentum)) if steps > 0 else 1
    amplification = 1 + np.max(np.abs(mean)) / np.sqrt(np.min(var) + 1e-5)
    return 16 * EPS32 * effective * amplification


def moments(x, mask=None):
    """Per-channel mean, biased variance and unbiased variance of the valid values of
    one batch, with `n` counting every valid value per channel."""
    values = valid_values(x, mask)
    n = values.shape[1]
    mean = values.mean(axis=1)
    var = values.var(axis=1)
    return mean, var, var * n / max(n - 1, 1)


def pooled_statistics(batches, masks, unbiased):
    """What recomputation gives: the mean of all valid values, and the pooled
    within-batch variance sum_b M2_b / sum_b (n_b - 1) (or / sum of n_b over batches
    with n_b >= 2, for biased variances)."""
    values = [valid_values(x, m) for x, m in zip(batches, masks)]
    values = [v for v in values if v.shape[1] > 0]  # batches of padding add nothing
    mean = np.concatenate(values, axis=1).mean(axis=1)
    m2 = sum(((v - v.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) for v in values)
    counts = [v.shape[1] for v in values]
    dof = sum(n - 1 if unbiased else n for n in counts if n >= 2)
    return mean, m2 / dof


def weights(approach, k, momentum):
    """The weight of batch i = 1..k in the running averages after k steps."""
    m = float(np.float32(momentum))  # the momentum as the layer holds it
    i = np.arange(1, k + 1)
    if approach == "ema":
        # r_1 = b_1; r_j = m r_{j-1} + (1 - m) b_j.
        w = (1 - m) * m ** (k - i)
        w[0] = m ** (k - 1)
        return w
    return (1 - m) * m ** (k - i) / (1 - m**k)


def inference_stats(approach, batches, momentum):
    """The (mean, var) that inference uses after training on `batches`."""
    if len(batches) == 0:
        return np.float64(0.0), np.float64(1.0)
    stats = [moments(b) for b in batches]
    w = weights(approach, len(batches), momentum)
    mean = sum(wi * s[0] for wi, s in zip(w, stats))
    var = sum(wi * s[2 if approach in UNBIASED else 1] for wi, s in zip(w, stats))
    return mean, var


def normalise(x, mean, var, eps):
    """`(x - mean) / sqrt(var + eps)` with per-channel statistics."""
    x = np.asarray(x, dtype=np.float64)
    mean = channel(np.broadcast_to(mean, (x.shape[1],)), x.ndim)
    var = channel(np.broadcast_to(var, (x.shape[1],)), x.ndim)
    return (x - mean) / np.sqrt(var + eps)


def warmup_fraction(k, warmup):
    return min(1.0, (k - 1) / max(warmup, 1))


def training_output(
    approach, batches, momentum, eps, *, r_max=3.0, d_max=5.0, warmup=0
):
    """The training-mode output (no affine) on the last of `batches`."""
    k, x = len(batches), batches[-1]
    mean_b, var_b, _ = moments(x)
    if approach in ("batch", "mode=batch"):
        return normalise(x, mean_b, var_b, eps)
    t = warmup_fraction(k, warmup)
    if approach == "batch_renorm":
        mean_r, var_r = inference_stats(approach, batches[:-1], momentum)
        std_b, std_r = np.sqrt(var_b + eps), np.sqrt(var_r + eps)
        r_bound, d_bound = 1 + (r_max - 1) * t, d_max * t
        r = np.clip(std_b / std_r, 1 / r_bound, r_bound)
        d = np.clip((mean_b - mean_r) / std_r, -d_bound, d_bound)
        return normalise(x, mean_b, var_b, eps) * channel(r, x.ndim) + channel(
            d, x.ndim
        )
    if approach == "ema_smooth_start":
        # Equinox issue #659: the moving average started at zero, plus m^k times this
        # batch; blended linearly with this batch over the warmup.
        m = float(np.float32(momentum))
        stats = [moments(b)[:2] for b in batches]
        zero_started = [
            sum((1 - m) * m ** (k - i) * s[j] for i, s in enumerate(stats, 1))
            for j in (0, 1)
        ]
        mean, var = (z + m**k * b for z, b in zip(zero_started, (mean_b, var_b)))
        mean, var = t * mean + (1 - t) * mean_b, t * var + (1 - t) * var_b
        return normalise(x, mean, var, eps)
    return normalise(x, *inference_stats(approach, batches, momentum), eps)
