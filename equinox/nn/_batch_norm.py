import functools as ft
import math
import numbers
import operator
import sys
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, cast, get_args, Literal, NamedTuple, SupportsIndex

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    Float,
    Inexact,
    Int,
    PRNGKeyArray,
    PyTree,
    Shaped,
)

from .._jit import filter_jit
from .._misc import default_floating_dtype
from .._module import field
from .._tree import tree_at
from ._misc import named_scope
from ._sequential import StatefulLayer
from ._stateful import State, StateIndex


Approach = Literal["batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start"]
_RECOMMENDED: Approach = "batch"
_GUIDE = "https://docs.kidger.site/equinox/api/nn/batch_norm_approaches/"
# The options each approach takes, with their defaults.
_OPTIONS: dict[Approach, dict[str, float]] = {
    "batch_renorm": {"r_max": 3.0, "d_max": 5.0, "warmup": 150},
    "ema_smooth_start": {"warmup": 0},
}
# One pass over the batch is exact enough while its mean is within this many of its
# standard deviations of the shift; beyond, the sums are redone around the batch mean.
_MAX_SHIFT = 4.0


# Arguments.


def _number(name: str, value: Any, integer: bool = False) -> Any:
    """`value` as a Python `int` or `float`; NumPy numbers and 0-d arrays of numbers
    are numbers too."""
    concrete = not isinstance(value, jax.core.Tracer)  # pyright: ignore
    if isinstance(value, (np.ndarray, jax.Array)) and concrete and value.shape == ():
        value = value.item()
    if not isinstance(value, bool):
        if integer and isinstance(value, numbers.Integral):
            return operator.index(value)
        if not integer and isinstance(value, numbers.Real):
            return float(value)
    raise ValueError(
        f"`BatchNorm({name}=...)` must be {'an integer' if integer else 'a number'}, "
        f"but got {value!r} of type `{type(value).__name__}`."
    )


def _warn_approach_unset(choices: str) -> None:
    # Point at the user's line: the first frame outside Equinox and the runtime
    # type-checkers that may wrap it.
    frame, level = sys._getframe(), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "equinox",
        "jaxtyping",
        "beartype",
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        "`eqx.nn.BatchNorm(..., approach=...)` is unspecified, so it defaults to the "
        "legacy 'ema' approach (the same as `mode='ema'`), which normalises the "
        "training forward pass with running averages and often trains poorly (equinox "
        f"issue #659). Pass `approach=` explicitly, one of {choices}. "
        f"'{_RECOMMENDED}' is recommended, followed by "
        "`eqx.nn.recompute_batch_norm_statistics` after training for exact inference "
        f"statistics. See {_GUIDE} for how to choose.",
        stacklevel=level,
    )


def _resolve_approach(
    approach: Any, mode: Any
) -> tuple[Approach, Literal["ema", "batch"] | None]:
    """The approach, and the value of `BatchNorm.mode`."""
    choices = ", ".join(repr(a) for a in get_args(Approach))
    if mode not in ("ema", "batch", "legacy"):
        raise ValueError(
            f"`BatchNorm(mode=...)` must be 'ema', 'batch' or 'legacy', but got "
            f"{mode!r}. New code should pass `approach=` instead, one of {choices}."
        )
    if approach is None:
        if mode == "legacy":
            _warn_approach_unset(choices)
            return "ema", "ema"
        return mode, mode
    if mode != "legacy":
        raise ValueError(
            "Pass only one of `BatchNorm(approach=...)` and `BatchNorm(mode=...)`: "
            f"`mode` is the older name for `approach`. Got `mode={mode!r}` and "
            f"`approach={approach!r}`; drop `mode`."
        )
    if approach not in get_args(Approach):
        raise ValueError(
            f"Unknown `BatchNorm(approach={approach!r})`; valid approaches are "
            f"{choices}."
        )
    return approach, None


def _resolve_options(approach: Approach, **given: Any) -> dict[str, Any]:
    """Checks the approach's options; returns them with their defaults filled in."""
    defaults = _OPTIONS.get(approach, {})
    options = dict(defaults)
    for name, value in given.items():
        if value is None:
            continue
        if name not in defaults:
            owners = " or ".join(
                f"`approach={a!r}`" for a, o in _OPTIONS.items() if name in o
            )
            raise ValueError(
                f"`BatchNorm({name}=...)` only applies to {owners}, but the approach "
                f"is {approach!r}. Remove `{name}`, or use {owners}."
            )
        options[name] = _number(name, value, integer=name == "warmup")
    # `warmup` divides the step count, an int32, which could never reach a larger one.
    bounds = (("r_max", 1, math.inf), ("d_max", 0, math.inf), ("warmup", 0, 2**31))
    for name, lower, upper in bounds:
        if name in options and not lower <= options[name] < upper:
            bound = "finite" if upper == math.inf else f"below {upper}"
            raise ValueError(
                f"`BatchNorm({name}=...)` must be {bound} and at least {lower}, but "
                f"got {options[name]!r}."
            )
    return options


# Statistics.


class _Stats(NamedTuple):
    mean: Array
    var: Array


class _Moments(NamedTuple):
    n: Array | int  # valid values per channel, over every named axis
    mean: Array
    var: Array  # biased


class _Normaliser(NamedTuple):
    """Normalises as `(x - mean) * scale + offset`, per channel."""

    mean: Array
    scale: Array
    offset: Array | float


def _check_complex(x: Array, stored_dtype, approach: Approach) -> None:
    """Training on complex values needs complex running averages, and an approach
    whose formulas hold for them."""
    if not jnp.iscomplexobj(x):
        return
    complex_dtype = jnp.promote_types(stored_dtype, x.dtype)
    if approach == "batch_renorm":
        raise ValueError(
            f"`BatchNorm(approach='batch_renorm')` got a {x.dtype} training input, "
            "but clips r and d, which are defined for real values only. Use "
            f"`approach='batch'` with `dtype=jnp.{complex_dtype}`."
        )
    if not jnp.issubdtype(stored_dtype, jnp.complexfloating):
        raise ValueError(
            f"`BatchNorm` got a {x.dtype} training input, but stores its running "
            f"averages in {stored_dtype}, which would lose the imaginary part of the "
            f"mean. Pass `dtype=jnp.{complex_dtype}` to `BatchNorm`."
        )


def _per_channel(values: Array, like: Array) -> Array:
    return jnp.expand_dims(values, tuple(range(1, like.ndim)))


def _sums(
    x: Array, valid: Array | None, axis_name: Hashable | Sequence[Hashable], shift
) -> _Moments:
    """The moments of the valid values of `x`, from sum(x - shift), sum|x - shift|^2
    and the count: one pass over `x`, one `psum`. Exact while the mean is within a few
    standard deviations of `shift`."""
    d = x - _per_channel(shift, x)
    if valid is not None:
        d = jnp.where(valid, d, 0)
    spatial = tuple(range(1, x.ndim))
    # One `psum` of a tuple is one all-reduce (a concatenation would cost a copy).
    sums = (jnp.sum(d, spatial), jnp.sum(d * jnp.conj(d), spatial).real)
    if valid is None:
        linear, square = lax.psum(sums, axis_name)
        n = lax.psum(1, axis_name) * math.prod(x.shape[1:])
    else:
        linear, square, n = lax.psum(
            sums + (jnp.sum(valid, dtype=sums[1].dtype),), axis_name
        )
    denominator = jnp.maximum(n, 1)
    mean = linear / denominator
    square = square / denominator
    var = jnp.maximum(square - (mean * jnp.conj(mean)).real, 0)
    return _Moments(n, shift + mean, var.astype(x.dtype))


@ft.cache
def _resum(axis_name: Hashable) -> Callable:
    """The exact branch of `_batch_moments`: the same function object for each axis
    name, so that `lax.cond` traces and compiles it once, not on every eager call."""

    def resum(x, valid, first):
        return _sums(x, valid, axis_name, first[0])[1:]

    return resum


def _keep(x, valid, first):
    return first


def _batch_moments(
    x: Array, valid: Array | None, axis_name: Hashable | Sequence[Hashable], shift
) -> _Moments:
    moments = _sums(x, valid, axis_name, shift)
    distance = (moments.mean - shift) * jnp.conj(moments.mean - shift)
    far = jnp.any(distance.real > _MAX_SHIFT**2 * moments.var.real)
    # The `lax.cond` sees no derivatives, so autodiff never traces it: the redone sums
    # give the values (exactly: `m - stop_gradient(m)` is 0), and the gradient is the
    # first pass's, which has the same derivative whatever the shift.
    x, first = lax.stop_gradient((x, moments[1:]))
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)  # `_resum` caches on it
    exact = lax.cond(far, _resum(axis_name), _keep, x, valid, first)
    mean, var = (
        e + (m - lax.stop_gradient(m)) for m, e in zip(moments[1:], exact, strict=True)
    )
    return _Moments(moments.n, mean, var)


def _bessel(n: Array | int) -> Array | float:
    """n / (n - 1), which makes the biased variance of n values unbiased."""
    if isinstance(n, int):
        return n / max(n - 1, 1)
    return n / jnp.maximum(n - 1, 1)


# Approaches: one function each, from the batch statistics, the running averages and
# the step number k (from 1) to how to normalise and the new running averages. The
# formulas are in the table of `BatchNorm`'s docstring.


def _running_average(running: _Stats, new: _Stats, step: Array, momentum) -> _Stats:
    # The exactly debiased average after k steps is x_k + c_k (previous - x_k), with
    # c_k = (m - m^k) / (1 - m^k): exactly 0 at k = 1, and m once m^k underflows.
    log_m = jnp.log(momentum)
    k = step.astype(log_m.dtype)
    return _blend(
        running, new, momentum * jnp.expm1((k - 1) * log_m) / jnp.expm1(k * log_m)
    )


def _blend(old: _Stats, new: _Stats, keep) -> _Stats:
    """`keep * old + (1 - keep) * new`; equal statistics stay exactly unchanged."""
    return _Stats(*(n + keep * (o - n) for o, n in zip(old, new)))


def _warmup_fraction(step: Array, warmup: int, dtype) -> Array:
    """0 on the first step, rising linearly to 1 at step `warmup + 1`."""
    return jnp.minimum(1, (step - 1) / max(warmup, 1)).astype(dtype)


def _normaliser(stats: _Stats, eps: float) -> _Normaliser:
    return _Normaliser(stats.mean, lax.rsqrt(stats.var + eps), 0.0)


def _batch(
    batch: _Stats,
    unbiased: _Stats,
    running: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
) -> tuple[_Normaliser, _Stats]:
    return _normaliser(batch, eps), _running_average(running, unbiased, step, momentum)


def _batch_renorm(
    batch: _Stats,
    unbiased: _Stats,
    running: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    r_max: float,
    d_max: float,
    warmup: int,
) -> tuple[_Normaliser, _Stats]:
    t = _warmup_fraction(step, warmup, momentum.dtype)
    r_bound, d_bound = 1 + (r_max - 1) * t, d_max * t
    std, running_std = jnp.sqrt(batch.var + eps), jnp.sqrt(running.var + eps)
    r = jnp.clip(std / running_std, 1 / r_bound, r_bound)
    d = jnp.clip((batch.mean - running.mean) / running_std, -d_bound, d_bound)
    normaliser = _Normaliser(
        batch.mean, lax.stop_gradient(r) / std, lax.stop_gradient(d)
    )
    return normaliser, _running_average(running, unbiased, step, momentum)


def _ema(
    batch: _Stats, running: _Stats, step: Array, momentum: Array, eps: float
) -> tuple[_Normaliser, _Stats]:
    running = _blend(running, batch, jnp.where(step == 1, 0, momentum))
    return _normaliser(running, eps), running


def _ema_debiased(
    batch: _Stats, running: _Stats, step: Array, momentum: Array, eps: float
) -> tuple[_Normaliser, _Stats]:
    running = _running_average(running, batch, step, momentum)
    return _normaliser(running, eps), running


def _ema_smooth_start(
    batch: _Stats,
    running: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    warmup: int,
) -> tuple[_Normaliser, _Stats]:
    running = _running_average(running, batch, step, momentum)
    t = _warmup_fraction(step, warmup, momentum.dtype)
    keep = t * (1 - momentum ** step.astype(momentum.dtype))
    return _normaliser(_blend(running, batch, keep), eps), running


# Equinox 0.13's `mode="batch"` state: h_k = m^k (0, 1) + (1 - m^k) x_k for the exactly
# debiased averages x_k. Kept, so that its checkpoints load.


def _decay(steps: Array, momentum: Array) -> tuple[Array, Array]:
    """`m**k` and `1 - m**k`, the latter to full relative precision."""
    k_log_m = steps.astype(momentum.dtype) * jnp.log(momentum)
    return jnp.exp(k_log_m), -jnp.expm1(k_log_m)


def _from_0_13(hidden: _Stats, steps: Array, momentum: Array) -> _Stats:
    decay, weight = _decay(steps, momentum)
    weight = jnp.where(steps == 0, 1, weight)  # step 0 is read as the initial stats
    return _Stats(hidden.mean / weight, (hidden.var - decay) / weight)


def _to_0_13(running: _Stats, steps: Array, momentum: Array) -> _Stats:
    decay, weight = _decay(steps, momentum)
    return _Stats(running.mean * weight, running.var * weight + decay)


def _initial(like: Array) -> _Stats:
    """The statistics before any training step: mean 0, variance 1."""
    return _Stats(jnp.zeros_like(like), jnp.ones_like(like))


def _saturated_steps(momentum: float) -> int:
    """A step count at which m**k is 0 in float32: the debiasing has no effect."""
    return min(2**31 - 2, math.ceil(-120 / math.log(momentum)))


class BatchNorm(StatefulLayer):
    r"""Normalises each channel with statistics computed over the batch (the named
    `vmap`/`pmap`/`shard_map` axes) and all spatial dimensions, then optionally applies
    a channelwise affine transformation:

    $$\frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \varepsilon}} \gamma_i + \beta_i.$$

    Which statistics $\mu, \sigma^2$ are used is chosen by `approach`. At the $k$-th
    training step, with momentum $m$, let $\mu_k, \sigma^2_k$ be the batch mean and
    variance over $n$ values per channel, $s^2_k = \frac{n}{n - 1} \sigma^2_k$, and
    $\bar{x}_k = \frac{1 - m}{1 - m^k} \sum_{i=1}^k m^{k-i} x_i$ the exactly debiased
    moving average of a statistic $x$. Inference uses the running averages, and
    $\mu = 0, \sigma^2 = 1$ before any training step.

    | `approach` | training normalises with | running averages of |
    |---|---|---|
    | `"batch"` | $\mu_k, \sigma^2_k$ | $\mu, s^2$ |
    | `"batch_renorm"` | $\mu_k, \sigma^2_k$, then $\times r + d$ (below) | $\mu, s^2$ |
    | `"ema"` | $\mu_1, \sigma^2_1$, then $m \cdot \text{previous} + (1 - m) \cdot (\mu_k, \sigma^2_k)$ | the same, not debiased |
    | `"ema_debiased"` | $\bar\mu_k, \bar\sigma^2_k$ | $\mu, \sigma^2$ |
    | `"ema_smooth_start"` | $\bar{x}_k + w_k (x_k - \bar{x}_k)$ for $x = \mu, \sigma^2$ | $\mu, \sigma^2$ |

    Batch Renormalization uses $r = \operatorname{clip}_{[1/r_{max}, r_{max}]}
    \sqrt{(\sigma^2_k + \varepsilon) / (\bar{s}^2_{k-1} + \varepsilon)}$ and $d =
    \operatorname{clip}_{[-d_{max}, d_{max}]} (\mu_k - \bar\mu_{k-1}) / \sqrt{\bar{s}^2_{k
    -1} + \varepsilon}$, without gradient; its bounds grow linearly from $1, 0$ over
    `warmup` steps. `"ema_smooth_start"` has $w_k = m^k$, blended linearly to $1$ over
    `warmup` steps.

    !!! faq "Which approach should I use?"

        `approach="batch"`, then [`equinox.nn.recompute_batch_norm_statistics`][]
        after training. The `"ema"` family normalises the training pass with running
        averages, which scales the gradient through the batch statistics by $1 - m$
        ([#659](https://github.com/patrick-kidger/equinox/issues/659)). See
        [Choosing a BatchNorm approach](batch_norm_approaches.md).

    !!! warning

        Call this layer inside a `vmap`, `pmap` or `shard_map` whose axis names include
        `axis_name`; otherwise JAX raises a `NameError`. One non-finite training batch
        makes the running averages non-finite; recompute them (or restore a
        checkpoint) to repair them.

    !!! example

        ```python
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            64, "batch", approach="batch"
        )
        forward = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, state = forward(x, state)  # x has shape (batch, 64, ...)
        ```

        To train data-parallel, `jax.device_put` the batch with a `NamedSharding` and
        `jit`; see the guide for `shard_map`.

    ??? cite

        [Batch Normalization](https://arxiv.org/abs/1502.03167) and
        [Batch Renormalization](https://arxiv.org/abs/1702.03275)

        ```bibtex
        @inproceedings{ioffe2015batch,
            author={Sergey Ioffe and Christian Szegedy},
            title={Batch Normalization: Accelerating Deep Network Training by
                   Reducing Internal Covariate Shift},
            booktitle={International Conference on Machine Learning},
            year={2015},
        }
        @inproceedings{ioffe2017batch,
            author={Sergey Ioffe},
            title={Batch Renormalization: Towards Reducing Minibatch Dependence in
                   Batch-Normalized Models},
            booktitle={Advances in Neural Information Processing Systems},
            year={2017},
        }
        ```
    """  # noqa: E501

    weight: Inexact[Array, "input_size"] | None
    bias: Inexact[Array, "input_size"] | None
    ema_first_time_index: None | StateIndex[Bool[Array, ""]]
    ema_state_index: (
        None
        | StateIndex[tuple[Inexact[Array, "input_size"], Inexact[Array, "input_size"]]]
    )
    batch_counter: None | StateIndex[Int[Array, ""]]
    batch_state_index: (
        None
        | StateIndex[tuple[Inexact[Array, "input_size"], Inexact[Array, "input_size"]]]
    )
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = field(static=True)
    approach: Approach = field(static=True)
    mode: Literal["ema", "batch"] | None = field(static=True)
    momentum: float = field(static=True)
    eps: float = field(static=True)
    channelwise_affine: bool = field(static=True)
    r_max: float | None = field(static=True)
    d_max: float | None = field(static=True)
    warmup: int | None = field(static=True)

    def __init__(
        self,
        input_size: SupportsIndex,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = None,
        inference: bool = False,
        dtype=None,
        mode: Literal["ema", "batch", "legacy"] = "legacy",
        *,
        approach: Approach | None = None,
        r_max: float | None = None,
        d_max: float | None = None,
        warmup: SupportsIndex | None = None,
    ):
        r"""**Arguments:**

        - `input_size`: The number of channels, the size of each example's first axis.
        - `axis_name`: The name of the batch axis (of a `jax.vmap`, `jax.pmap` or
            `jax.shard_map`) to reduce over, or a sequence of names to reduce over
            several.
        - `eps`: Added to the variance before taking its square root.
        - `channelwise_affine`: Whether to learn a scale $\gamma$ and an offset $\beta$
            per channel.
        - `momentum`: The weight $m$ on the previous running average, in $(0, 1)$:
            PyTorch's `momentum=0.1` is `0.9` here. Defaults to `0.99` (as in Equinox
            0.13) for `mode=` and `approach="ema"`, and to `0.9` otherwise.
        - `inference`: If `False`, normalise as `approach` says and update the running
            averages; if `True`, normalise with the running averages. Usually toggled
            with [`equinox.nn.inference_mode`][].
        - `dtype`: The dtype of $\gamma, \beta$, defaulting to JAX's default floating
            dtype. Statistics are computed in at least float32. The running averages
            are stored in `dtype` for `mode=` (as in Equinox 0.13, so its checkpoints
            load), and otherwise in `dtype` or float32, whichever is wider.
        - `mode`: Equinox 0.13's spelling: `"batch"` is `approach="batch"` with 0.13's
            encoding of the state, `"ema"` is `approach="ema"`, and `"legacy"` (the
            default) means unset. `self.mode` is `"ema"` or `"batch"` when the layer
            is built with `mode=` or with neither argument, and `None` with
            `approach=`.
        - `approach`: One of `"batch"`, `"batch_renorm"`, `"ema"`, `"ema_debiased"`
            and `"ema_smooth_start"`; see the table above. When neither `approach` nor
            `mode` is given, `"ema"` is used with a warning. (Keyword only argument.)
        - `r_max`, `d_max`: The bounds on $r$ and $d$ of `"batch_renorm"`, `3` and `5`
            by default. (Keyword only arguments.)
        - `warmup`: The number of steps over which `"batch_renorm"` and
            `"ema_smooth_start"` move from batch statistics to their own; `150` and
            `0` by default. (Keyword only argument.)

        **Raises:**

        A `ValueError` that names the argument, for an unknown `approach` or `mode`,
        both, a non-number, an `input_size` below 1, a `momentum` that is not in
        $(0, 1)$ in float32, a negative `eps`, or an option the approach does not take.
        """
        approach, self.mode = _resolve_approach(approach, mode)
        self.input_size = _number("input_size", input_size, integer=True)
        if self.input_size < 1:
            raise ValueError(
                f"`BatchNorm(input_size=...)` is the number of channels, at least 1, "
                f"but got {self.input_size}."
            )
        legacy = self.mode is not None or approach == "ema"
        self.momentum = _number(
            "momentum", (0.99 if legacy else 0.9) if momentum is None else momentum
        )
        if not 0 < np.float32(self.momentum) < 1:
            raise ValueError(
                "`BatchNorm(momentum=...)` is the weight kept on the old running "
                f"average and must lie strictly between 0 and 1 in float32, but got "
                f"{momentum!r}. PyTorch's `momentum=0.1` is `momentum=0.9` here."
            )
        eps = _number("eps", eps)
        if not 0 <= eps < math.inf:
            raise ValueError(
                f"`BatchNorm(eps=...)` must be finite and non-negative, but got "
                f"{eps!r}."
            )
        options = _resolve_options(approach, r_max=r_max, d_max=d_max, warmup=warmup)
        dtype = default_floating_dtype() if dtype is None else dtype
        if self.mode is None:
            with jax.numpy_dtype_promotion("standard"):
                state_dtype = jnp.promote_types(dtype, jnp.float32)
        else:
            state_dtype = dtype
        self.weight = jnp.ones(self.input_size, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(self.input_size, dtype) if channelwise_affine else None
        mean, var = _initial(jnp.zeros(self.input_size, state_dtype))
        if approach == "ema":
            self.ema_first_time_index = StateIndex(jnp.array(True))
            self.ema_state_index = StateIndex((mean, var))
            self.batch_counter = self.batch_state_index = None
        else:
            self.ema_first_time_index = self.ema_state_index = None
            self.batch_counter = StateIndex(jnp.array(0))
            self.batch_state_index = StateIndex((mean, var))
        self.axis_name = axis_name
        self.inference = inference
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.approach = approach
        self.r_max = options.get("r_max")
        self.d_max = options.get("d_max")
        self.warmup = options.get("warmup")

    @named_scope("eqx.nn.BatchNorm")
    def __call__(
        self,
        x: Shaped[Array, " channels *spatial"],
        state: State,
        *,
        inference: bool | None = None,
        mask: Bool[ArrayLike, "..."] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, State]:
        """**Arguments:**

        - `x`: One example, of shape `(input_size, *spatial)`.
        - `state`: The [`equinox.nn.State`][] holding the running averages.
        - `inference`: `True` or `False` overrides `self.inference` for this call.
            (Keyword only argument.)
        - `mask`: Which values of this example are real data, for padded batches: a
            boolean broadcastable to `x.shape[1:]` (a scalar masks the whole example).
            Training statistics use only the valid values of the whole batch, weighted
            by count across every named axis and device; masked values, even NaN,
            affect nothing. A training step with no valid value (for `approach=`: with
            fewer than two) leaves the state unchanged. (Keyword only argument.)
        - `key`: Ignored; accepted for compatibility with the rest of the Equinox API.
            (Keyword only argument.)

        **Returns:**

        A 2-tuple of:

        - An array of the shape of `x`, in its dtype if floating (float32 for integer
            inputs), and zero at masked positions.
        - The updated state (unchanged in inference).

        **Raises:**

        A `ValueError` if `x.shape[0] != input_size`, if `mask` is not a boolean of a
        broadcastable shape, if (for `approach=`) a training batch has one value per
        channel, whose variance is undefined, or if a complex training input meets real
        running averages or `"batch_renorm"`. A `NameError` if the call is not inside a
        transformation that names `axis_name`.
        """
        del key
        y, valid = self._prepare(x, mask)
        if inference is None:
            inference = self.inference
        steps, running = self._load(state, y.dtype)
        if inference:
            normaliser = _normaliser(running, self.eps)
        else:
            if valid is None and self.mode is None:
                if lax.psum(1, self.axis_name) * math.prod(x.shape[1:]) == 1:
                    raise ValueError(
                        f"`BatchNorm(approach={self.approach!r})` got a training batch "
                        "with one value per channel, whose variance is undefined. Use "
                        "a batch of at least 2, or `inference=True`."
                    )
            _check_complex(y, state.get(self._indices()[1])[0].dtype, self.approach)
            finite = jnp.isfinite(running.mean)
            shift = lax.stop_gradient(jnp.where(finite, running.mean, 0))
            batch = _batch_moments(y, valid, self.axis_name, shift)
            step = steps + 1
            normaliser, new = self._approach(batch, running, step)
            update = None
            if valid is not None:
                update = jnp.asarray(batch.n >= (1 if self.mode is not None else 2))
            state = self._store(state, step, new, update)
        return self._output(y, valid, normaliser, x.dtype), state

    def _prepare(self, x: Array, mask) -> tuple[Array, Array | None]:
        """`x` in the dtype the statistics are computed in, and the mask, broadcast."""
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"`BatchNorm(input_size={self.input_size})` received an input of shape "
                f"{x.shape}. Each example must have shape `(input_size, *spatial)`: "
                "pass `input_size` equal to the number of channels, and `vmap` over "
                "the batch axis with a matching `axis_name`."
            )
        valid = None
        if mask is not None:
            mask = jnp.asarray(mask)
            try:
                ok = jnp.broadcast_shapes(mask.shape, x.shape[1:]) == x.shape[1:]
            except ValueError:
                ok = False
            if mask.dtype != jnp.bool_ or not ok:
                raise ValueError(
                    "`BatchNorm(...)(x, state, mask=...)` must be a boolean array "
                    f"broadcastable to {x.shape[1:]}, the shape of one example without "
                    f"its channel axis, but got dtype {mask.dtype} and shape "
                    f"{mask.shape}."
                )
            valid = jnp.broadcast_to(mask, x.shape[1:])[None]
            # Masked values, which may be NaN, must not reach even a discarded branch
            # of the gradient.
            x = jnp.where(valid, x, jnp.zeros((), x.dtype))
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x.dtype, jnp.float32)
        return x.astype(dtype), valid

    def _output(self, y: Array, valid, normaliser: _Normaliser, dtype) -> Array:
        # (y - mean) * scale + offset, computed around a copy of the mean without
        # gradient, so the subtraction is exact and the gradient still reaches the mean.
        centre = lax.stop_gradient(normaliser.mean)
        scale = normaliser.scale
        offset = (centre - normaliser.mean) * scale + normaliser.offset
        if self.weight is not None and self.bias is not None:
            weight = self.weight.astype(y.dtype)
            scale, offset = scale * weight, offset * weight + self.bias.astype(y.dtype)
        out = (y - _per_channel(centre, y)) * _per_channel(scale, y)
        out = out + _per_channel(offset, y)
        if valid is not None:
            out = jnp.where(valid, out, 0)
        return out.astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else out

    def _approach(
        self, batch: _Moments, running: _Stats, step: Array
    ) -> tuple[_Normaliser, _Stats]:
        momentum = jnp.asarray(self.momentum, running.mean.dtype)
        stats = _Stats(batch.mean, batch.var)
        if self.approach == "ema":
            return _ema(stats, running, step, momentum, self.eps)
        if self.approach == "ema_debiased":
            return _ema_debiased(stats, running, step, momentum, self.eps)
        if self.approach == "ema_smooth_start":
            assert self.warmup is not None
            return _ema_smooth_start(
                stats, running, step, momentum, self.eps, self.warmup
            )
        unbiased = _Stats(batch.mean, batch.var * _bessel(batch.n))
        if self.approach == "batch_renorm":
            assert self.r_max is not None and self.d_max is not None
            assert self.warmup is not None
            return _batch_renorm(
                stats,
                unbiased,
                running,
                step,
                momentum,
                self.eps,
                self.r_max,
                self.d_max,
                self.warmup,
            )
        return _batch(stats, unbiased, running, step, momentum, self.eps)

    # The state: how each layout stores the step count and the running averages.

    def _indices(self) -> tuple[StateIndex, StateIndex]:
        if self.approach == "ema":
            assert self.ema_first_time_index is not None
            assert self.ema_state_index is not None
            return self.ema_first_time_index, self.ema_state_index
        assert self.batch_counter is not None and self.batch_state_index is not None
        return self.batch_counter, self.batch_state_index

    def _load(self, state: State, dtype) -> tuple[Int[Array, ""], _Stats]:
        """The number of training steps taken (for `"ema"`, 0 or 1), and the running
        averages in `dtype`: mean 0 and variance 1 before any step."""
        step_index, stats_index = self._indices()
        steps = state.get(step_index)
        if self.approach == "ema":  # stores whether no step has been taken
            steps = jnp.where(steps, 0, 1)
        running = _Stats(*(s.astype(dtype) for s in state.get(stats_index)))
        if self.mode == "batch":
            running = _from_0_13(running, steps, jnp.asarray(self.momentum, dtype))
        initial = _initial(running.mean)
        return steps, _Stats(
            *(jnp.where(steps == 0, i, r) for i, r in zip(initial, running))
        )

    def _store(
        self, state: State, steps: Array, running: _Stats, update: Array | None = None
    ) -> State:
        """`state` with these steps and running averages, where `update` is true."""
        step_index, stats_index = self._indices()
        if self.mode == "batch":
            momentum = jnp.asarray(self.momentum, running.mean.dtype)
            running = _to_0_13(running, steps, momentum)
        old = (state.get(step_index), state.get(stats_index))
        new = (
            jnp.full_like(old[0], steps == 0 if self.approach == "ema" else steps),
            tuple(r.astype(o.dtype) for r, o in zip(running, old[1])),
        )
        if update is not None:
            new = jtu.tree_map(lambda n, o: jnp.where(update, n, o), new, old)
        return state.set(step_index, new[0]).set(stats_index, new[1])


# Recomputing the inference statistics.


class _Totals(NamedTuple):
    """What one `BatchNorm` has seen while recomputing, summed over its calls."""

    calls: Int[Array, ""]
    n: Float[Array, ""]  # valid values
    dof: Float[Array, ""]  # the denominator of the variance
    mean: Array  # of all valid values
    m2: Array  # the sum over calls of the squared deviations from each call's mean


class _Recorder(StatefulLayer):
    """Stands in for a `BatchNorm` while recomputing: normalises with the batch
    statistics, as on a first training step, and adds them to its totals."""

    layer: BatchNorm
    totals: StateIndex[_Totals]
    inference: bool

    def __init__(self, layer: BatchNorm, totals: StateIndex[_Totals]):
        self.layer = layer
        self.totals = totals
        self.inference = False  # so that `forward` switching it on is caught

    def __call__(self, x, state, *, key=None, inference=None, mask=None):
        del key
        if self.inference if inference is None else inference:
            raise ValueError(
                "`eqx.nn.recompute_batch_norm_statistics(forward, ...)`: `forward` "
                "calls a `BatchNorm` in inference mode, so it would learn nothing. "
                "Call the model it is given as it is: do not pass it through "
                "`eqx.nn.inference_mode` inside `forward`, nor call it with "
                "`inference=True`. (Pass `eqx.nn.inference_mode(model)` as `model` "
                "to switch dropout off: its `BatchNorm`s still recompute.)"
            )
        layer = self.layer
        y, valid = layer._prepare(x, mask)
        old = state.get(self.totals)
        _check_complex(y, old.mean.dtype, layer.approach)
        first = _sums(y, valid, layer.axis_name, jnp.zeros(y.shape[0], y.dtype))
        batch = _sums(y, valid, layer.axis_name, lax.stop_gradient(first.mean))
        count = jnp.asarray(batch.n, old.n.dtype)
        total = old.n + count
        unbiased = layer.approach in ("batch", "batch_renorm")
        dof = jnp.where(count >= 2, count - 1 if unbiased else count, 0)
        mean, var = (s.astype(old.mean.dtype) for s in batch[1:])
        new = _Totals(
            old.calls + 1,
            total,
            old.dof + dof,
            old.mean + (mean - old.mean) * (count / jnp.maximum(total, 1)),
            old.m2 + var * count,
        )
        normaliser = _normaliser(_Stats(batch.mean, batch.var), layer.eps)
        return layer._output(y, valid, normaliser, x.dtype), state.set(self.totals, new)


def _batches(batches: Any) -> Iterable:
    """One batch at a time: the items of a list or iterator, or the slices along the
    leading axis of a PyTree of arrays."""
    if isinstance(batches, (list, Iterator)):
        return batches
    leaves = jtu.tree_leaves(batches)
    arrays = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]
    if leaves and all(arrays):
        if len({x.shape[:1] for x in leaves}) != 1 or leaves[0].ndim == 0:
            raise ValueError(
                "`eqx.nn.recompute_batch_norm_statistics(..., batches)`: stacked "
                "batches need a leading axis that indexes the batches, of the same "
                f"length in every array, but got shapes {[x.shape for x in leaves]}. "
                "Pass batches of different sizes as a list or an iterator."
            )
        return (jtu.tree_map(lambda x: x[i], batches) for i in range(len(leaves[0])))
    if any(arrays):
        odd = next(type(x).__name__ for x, a in zip(leaves, arrays) if not a)
        raise ValueError(
            "`eqx.nn.recompute_batch_norm_statistics(..., batches)`: stacked batches "
            f"must be a PyTree of arrays only, but it holds a `{odd}`. Make every leaf "
            "an array (or close over constants in `forward`), or pass the batches as "
            "a list or an iterator."
        )
    if isinstance(batches, Iterable):
        return batches
    raise ValueError(
        "`eqx.nn.recompute_batch_norm_statistics(..., batches)` must be a PyTree of "
        "arrays whose leading axis indexes the batches, or a list, iterator or "
        f"iterable of batches, but got {type(batches).__name__}."
    )


def _recorders(tree: PyTree) -> list[_Recorder]:
    is_recorder = lambda x: isinstance(x, _Recorder)
    leaves = jtu.tree_leaves(tree, is_leaf=is_recorder)
    return list({x.totals.marker: x for x in leaves if is_recorder(x)}.values())


@filter_jit
def _recompute_step(forward, recording, totals, batch):
    """Runs `forward` on one batch; returns each recorder's new totals."""
    recording = tree_at(
        lambda tree: [x.totals.init for x in _recorders(tree)], recording, totals
    )
    try:
        _, new_state = forward(recording, State(recording), batch)
        return [new_state.get(x.totals) for x in _recorders(recording)]
    except KeyError as error:  # `State.get` of a layer outside `recording`
        raise ValueError(
            "`eqx.nn.recompute_batch_norm_statistics`: `forward` did not call the "
            "`model` it was given with the `state` it was given: it read an entry "
            "that this state does not hold. `forward(model, state, batch)` must call "
            "them together."
        ) from error


def recompute_batch_norm_statistics(
    forward: Callable[[PyTree, State, Any], tuple[Any, State]],
    model: PyTree,
    state: State,
    batches: Any,
) -> State:
    r"""Recomputes the inference statistics of every [`equinox.nn.BatchNorm`][] in
    `model` exactly, from `batches` pushed through the final network ("precise batch
    normalisation", as PyTorch's `torch.optim.swa_utils.update_bn`).

    Running averages lag behind the network while it trains. This replaces them by the
    mean of all valid values the layer sees, and the pooled within-batch variance
    $\sum_b \sum_i (x_{b,i} - \mu_b)^2 / \sum_b (n_b - 1)$ (with $n_b$ in place of
    $n_b - 1$ for the `"ema"` family, which keeps biased variances). Each call of a
    layer counts as one batch, weighted by its count of valid values; a call with one
    valid value adds to the mean only.

    !!! example

        ```python
        def forward(model, state, x):
            batched = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
            return batched(x, state)

        state = eqx.nn.recompute_batch_norm_statistics(
            forward, model, state, (x for x, _ in loader)
        )
        ```

    **Arguments:**

    - `forward`: Called as `forward(model, state, batch)`; returns a pair whose second
        element is the new state. It must call the `model` it is given, without
        switching it to inference mode.
    - `model`: A PyTree containing `BatchNorm`s. They run in training mode whatever
        their `inference` flag; everything else runs as given, so
        [`equinox.nn.inference_mode`][]`(model)` switches dropout off.
    - `state`: The [`equinox.nn.State`][] of `model`.
    - `batches`: Either a PyTree of arrays whose leading axis indexes the batches (a
        tuple of arrays is such a PyTree), or a list, iterator or generator of batches
        (of any sizes, read one at a time: a data loader). Each batch's step is
        compiled once per shape.

    **Returns:**

    A new state in which each `BatchNorm` holds the recomputed statistics, as after a
    long training, and every other entry is unchanged.

    **Raises:**

    A `ValueError` if `model` has no `BatchNorm`, `batches` is empty, `forward` does
    not call every `BatchNorm` of `model` or calls one in inference mode, stacked
    `batches` differ in length or hold a leaf that is not an array, no batch has two
    valid values, a batch is complex and the running averages are real, or this
    function is called inside `jax.jit` (it compiles each batch itself).
    """
    is_layer = lambda x: isinstance(x, BatchNorm)
    name = "`eqx.nn.recompute_batch_norm_statistics`"

    def outside_jit(tree):
        leaves = jtu.tree_leaves(tree)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # pyright: ignore
            raise ValueError(
                f"Call {name} outside `jax.jit` and other transformations: it "
                "compiles each batch."
            )

    outside_jit((model, state))
    # One recorder per layer, by the marker of its running averages (a layer may
    # appear twice). Its totals have a marker of their own, so that reading the
    # original state instead of the one `forward` is given is a `KeyError`.
    recorders: dict[Any, _Recorder] = {}
    # Each layer and where it is in `model`, by the marker of its recorder's totals.
    layers: dict[Any, tuple[BatchNorm, str]] = {}

    def swap(path, leaf):
        # Every other stateful layer gets its current state as its initial one, so
        # that `State` can be built anew; each `BatchNorm` becomes a recorder whose
        # totals take the place of its running averages.
        if isinstance(leaf, StateIndex):
            return tree_at(lambda i: i.init, leaf, state.get(leaf))
        if not is_layer(leaf):
            return leaf
        _, stats_index = leaf._indices()
        marker = stats_index.marker
        if marker not in recorders:
            with jax.numpy_dtype_promotion("standard"):
                dtype = jnp.result_type(state.get(stats_index)[0], jnp.float32)
            zeros = jnp.zeros(leaf.input_size, dtype)
            totals = _Totals(jnp.array(0), zeros[0].real, zeros[0].real, zeros, zeros)
            without_state = tree_at(lambda b: b._indices(), leaf, (None, None))
            recorders[marker] = _Recorder(without_state, StateIndex(totals))
            layers[recorders[marker].totals.marker] = (leaf, f"model{jtu.keystr(path)}")
        return recorders[marker]

    recording = jtu.tree_map_with_path(
        swap, model, is_leaf=lambda x: is_layer(x) or isinstance(x, StateIndex)
    )
    if not recorders:
        raise ValueError(
            f"{name}(forward, model, ...) found no `BatchNorm` in `model`."
        )
    ordered = _recorders(recording)
    totals = [cast(_Totals, x.totals.init) for x in ordered]
    seen = 0
    for seen, batch in enumerate(_batches(batches), 1):
        outside_jit(batch)
        totals = _recompute_step(forward, recording, totals, batch)
    if seen == 0:
        raise ValueError(f"{name}(..., batches) got no batch.")
    uncalled = [
        f"`{layers[x.totals.marker][1]}`"
        for x, t in zip(ordered, totals)
        if int(t.calls) == 0
    ]
    if uncalled:
        layers_named = "`BatchNorm`" + "s" * (len(uncalled) > 1)
        raise ValueError(
            f"{name}: `forward` did not call the {layers_named} at "
            f"{', '.join(uncalled)}, or returned the state it was given instead of the "
            "one that its call of the model returns. Pass as `model` only the part of "
            "the model that `forward` calls."
        )
    state = jtu.tree_map(lambda x: x, state)  # a copy: `State.set` spends its input
    for recorder, total in zip(ordered, totals):
        if float(total.dof) == 0:
            raise ValueError(
                f"{name}: no batch had two or more valid values per channel, so the "
                "variance is undefined."
            )
        layer, _ = layers[recorder.totals.marker]
        steps = jnp.array(_saturated_steps(float(np.float32(layer.momentum))))
        state = layer._store(state, steps, _Stats(total.mean, total.m2 / total.dof))
    return state
