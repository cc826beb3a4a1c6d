"""Independent float64 NumPy reference for `eqx.nn.BatchNorm`'s approaches.

Written from the formulas in the layer's documentation, as closed forms over the whole
sequence of batches (not as the layer's step-by-step recursion), and never calling the
layer. Batches have shape `(batch, channels, *spatial)`.
"""

import numpy as np


APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
# Approaches whose running statistics accumulate the unbiased batch variance.
UNBIASED = ("batch", "batch_renorm")


def moments(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, biased variance and unbiased variance of one batch."""
    x = np.asarray(x, dtype=np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    return mean, var, var * n / max(n - 1, 1)


def ema_weights(k: int, momentum: float, approach: str) -> np.ndarray:
    """The weight of batch i = 1..k in the running statistics after k steps."""
    m = momentum
    i = np.arange(1, k + 1)
    if approach == "ema":
        # r_1 = b_1; r_j = m r_{j-1} + (1 - m) b_j.
        weights = (1 - m) * m ** (k - i)
        weights[0] = m ** (k - 1)
        return weights
    # Debiased: (1 - m) m^(k - i) / (1 - m^k).
    return (1 - m) * m ** (k - i) / (1 - m**k)


def inference_stats(approach: str, batches, momentum: float):
    """The (mean, var) that inference uses after training on `batches`."""
    if len(batches) == 0:
        return 0.0, 1.0
    stats = [moments(b) for b in batches]
    weights = ema_weights(len(batches), momentum, approach)
    var_index = 2 if approach in UNBIASED else 1
    mean = sum(w * s[0] for w, s in zip(weights, stats))
    var = sum(w * s[var_index] for w, s in zip(weights, stats))
    return mean, var


def normalise(x, mean, var, eps: float):
    """`(x - mean) / sqrt(var + eps)` with per-channel statistics."""
    x = np.asarray(x, dtype=np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.broadcast_to(np.asarray(mean, np.float64), (x.shape[1],))
    var = np.broadcast_to(np.asarray(var, np.float64), (x.shape[1],))
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def training_output(
    approach: str,
    batches,
    momentum: float,
    eps: float,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup: int = 0,
):
    """The training-mode output (no affine) for the last of `batches`."""
    k = len(batches)
    x = batches[-1]
    mean_b, var_b, _ = moments(x)
    if approach == "batch":
        return normalise(x, mean_b, var_b, eps)
    if approach == "batch_renorm":
        if k == 1:
            return normalise(x, mean_b, var_b, eps)
        mean_r, var_r = inference_stats(approach, batches[:-1], momentum)
        std_b, std_r = np.sqrt(var_b + eps), np.sqrt(var_r + eps)
        t = min(1.0, (k - 1) / warmup) if warmup > 0 else 1.0
        r_bound, d_bound = 1 + (r_max - 1) * t, d_max * t
        r = np.clip(std_b / std_r, 1 / r_bound, r_bound)
        d = np.clip((mean_b - mean_r) / std_r, -d_bound, d_bound)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return normalise(x, mean_b, var_b, eps) * r.reshape(shape) + d.reshape(shape)
    if approach in ("ema", "ema_debiased"):
        mean, var = inference_stats(approach, batches, momentum)
        return normalise(x, mean, var, eps)
    assert approach == "ema_smooth_start"
    # Zero-started EMA h_k, plus m^k times this batch.
    weights = (1 - momentum) * momentum ** (k - np.arange(1, k + 1))
    stats = [moments(b) for b in batches]
    mean = sum(w * s[0] for w, s in zip(weights, stats)) + momentum**k * mean_b
    var = sum(w * s[1] for w, s in zip(weights, stats)) + momentum**k * var_b
    if warmup > 0:
        t = min(1.0, (k - 1) / warmup)
        mean = t * mean + (1 - t) * mean_b
        var = t * var + (1 - t) * var_b
    return normalise(x, mean, var, eps)
