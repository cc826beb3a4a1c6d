import sys
import warnings
from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple, TypeAlias

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Inexact, Int, PRNGKeyArray

from .._misc import default_floating_dtype
from .._module import field
from ._misc import named_scope
from ._sequential import StatefulLayer
from ._stateful import State, StateIndex


Approach: TypeAlias = Literal[
    "batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start"
]
_APPROACHES: tuple[Approach, ...] = (
    "batch",
    "batch_renorm",
    "ema",
    "ema_debiased",
    "ema_smooth_start",
)
_RECOMMENDED: Approach = "batch_renorm"
_GUIDE = "https://docs.kidger.site/equinox/api/nn/batch_norm_approaches/"
_Stats: TypeAlias = tuple[Array, Array]
AxisName: TypeAlias = Hashable | Sequence[Hashable]
# Steps over which "batch_renorm" relaxes its bounds from plain batch normalisation:
# without it, r reaches r_max while activations still drift quickly early in training,
# and the gradient norm peaks ~1.4x higher than "batch"'s (see the guide).
_RENORM_WARMUP = 150


class _BatchMoments(NamedTuple):
    """The statistics of one training batch, per channel, over every reduced position
    on every named axis."""

    mean: Array
    var: Array  # biased: the mean squared deviation
    unbiased_var: Array  # var * n / (n - 1), or var itself when n == 1
    centred: Array  # x - mean, kept so that the output reuses it


class _Affine(NamedTuple):
    """Per-channel `scale` and `shift` so that the normalised output is
    `(x - reference) * scale + shift`. Training uses the batch mean as the reference;
    inference uses the running mean."""

    scale: Array
    shift: Array


def _standardise(reference: Array, mean: Array, var: Array, eps: float) -> _Affine:
    """The affine map `(x - mean) / sqrt(var + eps)`, written around `reference`."""
    scale = lax.rsqrt(var + eps)
    return _Affine(scale, (reference - mean) * scale)


def _ema_step(running: _Stats, new: _Stats, momentum: Array) -> _Stats:
    """`momentum * running + (1 - momentum) * new`, for the mean and the variance."""
    return tuple(momentum * r + (1 - momentum) * n for r, n in zip(running, new))  # pyright: ignore


def _debiased(
    hidden: _Stats, step: Array, momentum: Array, var_seed: float = 0.0
) -> _Stats:
    """Exactly debiased running statistics after `step` updates.

    An accumulator started at `seed` and updated `k` times with `_ema_step` holds
    `m**k * seed + (1 - m) * sum_i m**(k - i) * b_i`. The weights on the `b_i` sum to
    `1 - m**k`, so

    `(hidden - m**k * seed) / (1 - m**k)`

    is their exactly weighted average. The mean accumulator always starts at 0; the
    variance accumulator at `var_seed` (1 only for "batch", the 0.13 layout).
    Before any update (`k == 0`) this returns mean 0 and variance 1. `1 - m**k` is
    evaluated as `-expm1(k log m)` so that it keeps full relative precision for
    momentum near 1.
    """
    k = step.astype(momentum.dtype)
    log_m = jnp.log(momentum)
    decay = jnp.exp(k * log_m)
    trained = step > 0
    weight = jnp.where(trained, -jnp.expm1(k * log_m), 1)
    mean, var = hidden
    mean, var = mean / weight, (var - decay * var_seed) / weight
    return jnp.where(trained, mean, 0), jnp.where(trained, var, 1)


def _warmup_fraction(step: Array, warmup: int, dtype) -> Array:
    """`min(1, (k - 1) / warmup)` at training step `k`: 0 on the first step, 1 from
    step `warmup + 1` on (1 throughout if `warmup` is 0)."""
    if warmup == 0:
        return jnp.ones((), dtype)
    return jnp.minimum(1, (step - 1) / warmup).astype(dtype)


def _batch(
    batch: _BatchMoments, hidden: _Stats, momentum: Array, eps: float
) -> tuple[_Affine, _Stats]:
    """`"batch"`: normalise with the batch statistics; accumulate the batch mean and
    the unbiased batch variance for inference.

    $y = (x - \\mu_B) / \\sqrt{\\sigma^2_B + \\varepsilon}$, and
    $h \\leftarrow m h + (1 - m) (\\mu_B, \\tfrac{n}{n-1}\\sigma^2_B)$.
    """
    affine = _Affine(lax.rsqrt(batch.var + eps), jnp.zeros_like(batch.mean))
    return affine, _ema_step(hidden, (batch.mean, batch.unbiased_var), momentum)


def _batch_renorm(
    batch: _BatchMoments,
    hidden: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    r_max: float,
    d_max: float,
    warmup: int,
) -> tuple[_Affine, _Stats]:
    """`"batch_renorm"` (Ioffe 2017): the batch statistics, corrected towards the
    debiased running statistics $(\\mu, \\sigma^2)$ held *before* this step:

    $y = \\frac{x - \\mu_B}{\\sigma_B} r + d$, with $\\sigma_B = \\sqrt{\\sigma^2_B +
    \\varepsilon}$, $r = \\operatorname{clip}_{[1/r_{max}, r_{max}]}(\\sigma_B /
    \\sqrt{\\sigma^2 + \\varepsilon})$ and $d = \\operatorname{clip}_{[-d_{max},
    d_{max}]}((\\mu_B - \\mu) / \\sqrt{\\sigma^2 + \\varepsilon})$.

    $r$ and $d$ carry no gradient, and are 1 and 0 on the first step. With
    `warmup` $= W > 0$ the bounds grow linearly from $(1, 0)$ to $(r_{max},
    d_{max})$ over the first $W$ steps. Without clipping,
    $y = (x - \\mu) / \\sqrt{\\sigma^2 + \\varepsilon}$: the inference output.
    Accumulates like `"batch"`.
    """
    mean, var = _debiased(hidden, step - 1, momentum)
    batch_std = jnp.sqrt(batch.var + eps)
    running_std = jnp.sqrt(var + eps)
    t = _warmup_fraction(step, warmup, var.dtype)
    r_bound = 1 + (r_max - 1) * t
    d_bound = d_max * t
    r = jnp.clip(batch_std / running_std, 1 / r_bound, r_bound)
    d = jnp.clip((batch.mean - mean) / running_std, -d_bound, d_bound)
    first = step == 1
    r = lax.stop_gradient(jnp.where(first, 1, r))
    d = lax.stop_gradient(jnp.where(first, 0, d))
    affine = _Affine(r / batch_std, d)
    return affine, _ema_step(hidden, (batch.mean, batch.unbiased_var), momentum)


def _ema_debiased(
    batch: _BatchMoments,
    hidden: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
) -> tuple[_Affine, _Stats]:
    """`"ema_debiased"` (Adam-style): normalise with the zero-initialised EMA of the
    batch statistics $h_k$, divided by $1 - m^k$ after the $k$-th update.
    """
    hidden = _ema_step(hidden, (batch.mean, batch.var), momentum)
    mean, var = _debiased(hidden, step, momentum)
    return _standardise(batch.mean, mean, var, eps), hidden


def _ema_smooth_start(
    batch: _BatchMoments,
    hidden: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    warmup: int,
) -> tuple[_Affine, _Stats]:
    """`"ema_smooth_start"` (equinox issue #659): normalise with
    $h_k + m^k b_k$, where $h_k$ is the zero-initialised EMA after the $k$-th update
    and $b_k$ the batch statistics. The weights sum to one: pure batch statistics at
    $k = 1$, the running statistics once $m^k$ is small. With `warmup` $= W > 0$ this
    is blended linearly with the batch statistics,
    $t \\,(h_k + m^k b_k) + (1 - t)\\, b_k$ with $t = \\min(1, (k - 1) / W)$.
    """
    hidden = _ema_step(hidden, (batch.mean, batch.var), momentum)
    decay = jnp.exp(step.astype(momentum.dtype) * jnp.log(momentum))
    mean, var = (h + decay * b for h, b in zip(hidden, (batch.mean, batch.var)))
    if warmup > 0:
        t = _warmup_fraction(step, warmup, momentum.dtype)
        mean = t * mean + (1 - t) * batch.mean
        var = t * var + (1 - t) * batch.var
    return _standardise(batch.mean, mean, var, eps), hidden


def _ema_legacy(
    batch: _BatchMoments,
    running: _Stats,
    first_time: Array,
    momentum: float,
    eps: float,
) -> tuple[_Affine, _Stats]:
    """`"ema"` (Equinox 0.13): normalise with the running statistics *after* updating
    them with this batch, $r \\leftarrow m r + (1 - m) b$, with $r = b$ on the first
    step. Gradients through the batch statistics are scaled by $1 - m$.
    """
    mean, var = (
        jnp.where(first_time, b, (1 - momentum) * b + momentum * r)
        for b, r in zip((batch.mean, batch.var), running)
    )
    return _standardise(batch.mean, mean, var, eps), (mean, var)


def _batch_moments(x: Array, axis_name: AxisName) -> _BatchMoments:
    """Per-channel mean and variance of `x` over its spatial axes and the named axes.

    Two passes (mean, then mean squared deviation), which stays accurate when the
    mean is large compared to the spread.
    """
    spatial = tuple(range(1, x.ndim))
    channelwise = (slice(None),) + (None,) * len(spatial)
    mean = lax.pmean(jnp.mean(x, axis=spatial), axis_name)
    centred = x - mean[channelwise]
    squares = (centred * jnp.conj(centred)).real.astype(x.dtype)
    var = lax.pmean(jnp.mean(squares, axis=spatial), axis_name)
    count = lax.psum(1, axis_name) * (x.size // x.shape[0])
    unbiased_var = var * (count / max(count - 1, 1))
    return _BatchMoments(mean, var, unbiased_var, centred)


class BatchNorm(StatefulLayer):
    r"""Normalises each channel of its input with statistics computed over the batch
    (the named `vmap`/`pmap`/`shard_map` axes) and the spatial dimensions, then
    optionally applies a channelwise affine transformation.

    Given an input $x = [x_1, \ldots, x_C]$ with $C$ channels, this layer computes

    $$\frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \varepsilon}} \gamma_i + \beta_i$$

    for each channel $i$, where $\gamma, \beta$ are learnt if
    `channelwise_affine=True` (and are $1, 0$ otherwise). How $\mu$ and $\sigma^2$
    are chosen during training, and which running statistics are kept for inference,
    is set by `approach`:

    | `approach` | training normalises with | inference uses |
    |---|---|---|
    | `"batch"` | the batch statistics | the debiased EMA of the batch mean and unbiased variance |
    | `"batch_renorm"` | the batch statistics, corrected by $r, d$ | as `"batch"` |
    | `"ema"` | the running statistics, just updated | the running statistics |
    | `"ema_debiased"` | the debiased running statistics, just updated | the same |
    | `"ema_smooth_start"` | $h_k + m^k b_k$ | the debiased running statistics |

    With momentum $m$ and batch statistics $b_k$ at the $k$-th training step, the
    running statistics are $h_k = m h_{k-1} + (1 - m) b_k$, started from zero, and
    "debiased" means $h_k / (1 - m^k)$: exactly the weighted average of the batches
    seen so far. (Batch Renormalization's $r$ and $d$ are described under
    `approach` below.) Before any training step, inference uses mean 0 and variance
    1 for every approach.

    !!! faq "Which approach should I use?"

        `approach="batch_renorm"` for new code: it trains like standard batch
        normalisation, and because its training output is corrected towards the
        running statistics, inference behaves like training, whatever the momentum.
        `approach="batch"` is the standard batch normalisation of PyTorch, Flax and
        Haiku; at high momentum its inference statistics lag behind training. Avoid
        the `"ema"` family: it normalises the training forward pass with running
        statistics, which scales the gradient through the batch statistics by
        $1 - m$ and causes the instability of
        [equinox issue #659](https://github.com/patrick-kidger/equinox/issues/659).
        The guide [Choosing a BatchNorm approach](batch_norm_approaches.md) has the
        measurements.

    !!! warning

        This layer must be used inside a `vmap`, `pmap` or `shard_map` with a
        matching `axis_name`. (Not doing so raises a `NameError`.)

    !!! warning "Momentum convention"

        `momentum` is the weight kept on the *old* running value, as in Haiku and
        Flax. PyTorch's `momentum=0.1` corresponds to `momentum=0.9` here.

    !!! example

        ```python
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            64, axis_name="batch", approach="batch"
        )
        batched = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, state = batched(x, state)  # training
        y, _ = batched(x, state, inference=True)  # or use `eqx.nn.inference_mode`
        ```

    ??? cite

        [Batch Normalization: Accelerating Deep Network Training by Reducing
        Internal Covariate Shift](https://arxiv.org/abs/1502.03167)

        ```bibtex
        @inproceedings{ioffe2015batch,
            author={Sergey Ioffe and Christian Szegedy},
            title={Batch Normalization: Accelerating Deep Network Training by
                   Reducing Internal Covariate Shift},
            booktitle={International Conference on Machine Learning},
            year={2015},
        }
        ```

        [Batch Renormalization: Towards Reducing Minibatch Dependence in
        Batch-Normalized Models](https://arxiv.org/abs/1702.03275)

        ```bibtex
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
    axis_name: AxisName
    inference: bool
    input_size: int = field(static=True)
    eps: float = field(static=True)
    channelwise_affine: bool = field(static=True)
    momentum: float = field(static=True)
    approach: Approach = field(static=True)
    r_max: float | None = field(static=True)
    d_max: float | None = field(static=True)
    warmup: int | None = field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: AxisName,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype=None,
        mode: str | None = None,
        *,
        approach: str | None = None,
        r_max: float | None = None,
        d_max: float | None = None,
        warmup: int | None = None,
    ):
        """**Arguments:**

        - `input_size`: The number of channels in the input array.
        - `axis_name`: The name of the batch axis to compute statistics over, as passed
            to `axis_name` in `jax.vmap`, `jax.pmap` or `jax.shard_map`. Can also be a
            sequence (e.g. a tuple or a list) of names, to compute statistics over
            several named axes.
        - `eps`: Value added to the variance for numerical stability. Must be
            non-negative. Defaults to `1e-5`.
        - `channelwise_affine`: Whether the module has learnable channelwise affine
            parameters $\\gamma, \\beta$. Defaults to `True`.
        - `momentum`: The weight kept on the old value when the running statistics are
            updated, strictly between 0 and 1. (PyTorch's `momentum=0.1` is
            `momentum=0.9` here.) Defaults to `0.99`.
        - `inference`: If `False` then the batch statistics are computed and the
            running statistics updated. If `True` then the running statistics are
            used for normalisation and the state is left unchanged. This may be
            toggled with [`equinox.nn.inference_mode`][] or overridden during
            [`equinox.nn.BatchNorm.__call__`][]. Defaults to `False`.
        - `dtype`: The dtype of the weight and bias. Defaults to either
            `jax.numpy.float32` or `jax.numpy.float64` depending on whether JAX is in
            64-bit mode. The running statistics are kept in this dtype or float32,
            whichever is wider, so that half-precision models keep exact statistics.
        - `mode`: The 0.13 spelling of `approach`: `mode="ema"` is `approach="ema"`
            and `mode="batch"` is `approach="batch"`. Cannot be combined with
            `approach`.
        - `approach`: How the statistics are computed; one of `"batch"`,
            `"batch_renorm"`, `"ema"`, `"ema_debiased"` and `"ema_smooth_start"`
            (keyword only):
            - `"batch"`: training normalises with the batch mean and the biased batch
                variance. The running statistics accumulate the batch mean and the
                unbiased variance $\\tfrac{n}{n-1}\\sigma^2_B$, where $n$ counts every
                position reduced per channel (spatial positions times the size of
                every named axis), as in PyTorch. When $n = 1$ the biased variance
                (zero) is accumulated instead. Inference uses their exactly debiased
                average. The state has the same layout as `mode="batch"` in Equinox
                0.13 (a counter, and a mean and a variance started at 0 and 1), and
                the variance's starting value is subtracted exactly, so 0.13
                checkpoints load and are corrected.
            - `"batch_renorm"`: Batch Renormalization. Training normalises with
                $\\frac{x - \\mu_B}{\\sigma_B} r + d$, where
                $\\sigma_B = \\sqrt{\\sigma^2_B + \\varepsilon}$,
                $r = \\operatorname{clip}(\\sigma_B / \\sigma, 1/r_{max}, r_{max})$ and
                $d = \\operatorname{clip}((\\mu_B - \\mu) / \\sigma, -d_{max},
                d_{max})$ carry no gradient, and $(\\mu, \\sigma^2 - \\varepsilon)$ are
                the debiased running statistics from before this step ($r = 1$,
                $d = 0$ on the first step; the bounds start at 1 and 0 and reach
                $r_{max}, d_{max}$ after `warmup` steps). Unclipped, the training
                output equals the inference output. Running statistics as for
                `"batch"`. Recommended.
            - `"ema"`: the behaviour of Equinox 0.13's default: training normalises
                with the running statistics after updating them with this batch, and
                the first step uses the batch statistics. Kept for compatibility; it
                trains poorly (equinox issue #659).
            - `"ema_debiased"`: as `"ema"`, but the running statistics start at zero
                and are divided by $1 - m^k$ after $k$ steps, as Adam does.
            - `"ema_smooth_start"`: training normalises with $h_k + m^k b_k$, the
                zero-started running statistics plus $m^k$ times this batch's
                statistics. Inference uses the debiased running statistics.

            The `"ema"` family averages the biased batch variance (the one it
            normalises with). If neither `approach` nor `mode` is given, `"ema"` is
            used and a warning recommends choosing one.
        - `r_max`: For `"batch_renorm"` only: the bound on $r$, at least 1. Defaults
            to 3. (Keyword only.)
        - `d_max`: For `"batch_renorm"` only: the bound on $d$, non-negative.
            Defaults to 5. (Keyword only.)
        - `warmup`: For `"batch_renorm"` and `"ema_smooth_start"`: a number of steps
            over which training moves linearly from pure batch statistics to the
            approach's own. For `"batch_renorm"` the bounds grow from $r_{max} = 1$,
            $d_{max} = 0$ to their values, as the paper recommends; defaults to 150.
            For `"ema_smooth_start"` the statistics are blended; defaults to 0 (no
            warmup). (Keyword only.)

        **Raises:**

        A `ValueError` for an unknown `approach` or `mode`, both `approach` and `mode`,
        a `momentum` outside $(0, 1)$, a negative `eps`, or an option given to an
        approach that does not use it.
        """
        approach = _resolve_approach(approach, mode)
        _check_options(
            approach,
            momentum=momentum,
            eps=eps,
            r_max=r_max,
            d_max=d_max,
            warmup=warmup,
        )
        if approach == "batch_renorm":
            r_max = 3.0 if r_max is None else r_max
            d_max = 5.0 if d_max is None else d_max
            warmup = _RENORM_WARMUP if warmup is None else warmup
        if approach == "ema_smooth_start" and warmup is None:
            warmup = 0

        dtype = default_floating_dtype() if dtype is None else dtype
        with jax.numpy_dtype_promotion("standard"):
            state_dtype = jnp.promote_types(dtype, jnp.float32)
        self.weight = jnp.ones(input_size, dtype) if channelwise_affine else None
        self.bias = jnp.zeros(input_size, dtype) if channelwise_affine else None
        zeros = jnp.zeros((input_size,), dtype=state_dtype)
        if approach == "ema":
            # 0.13 layout: a first-step flag and the running (mean, var).
            self.ema_first_time_index = StateIndex(jnp.array(True))
            self.ema_state_index = StateIndex((zeros, zeros))
            self.batch_counter = None
            self.batch_state_index = None
        else:
            # A step counter and the EMA accumulators for (mean, var). "batch" keeps
            # 0.13's start of (0, 1); the others start at zero.
            var_seed = jnp.full_like(zeros, _var_seed(approach))
            self.ema_first_time_index = None
            self.ema_state_index = None
            self.batch_counter = StateIndex(jnp.array(0))
            self.batch_state_index = StateIndex((zeros, var_seed))
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.approach = approach
        self.r_max = r_max
        self.d_max = d_max
        self.warmup = warmup

    @property
    def mode(self) -> Approach:
        """The approach in use; the name Equinox 0.13 gave this attribute."""
        return self.approach

    @named_scope("eqx.nn.BatchNorm")
    def __call__(
        self,
        x: Array,
        state: State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Array, State]:
        """**Arguments:**

        - `x`: One example: an array of shape `(input_size, *spatial)`, with any
            number (including zero) of spatial dimensions. Call the layer under
            `vmap` (or `pmap`/`shard_map`) over the batch.
        - `state`: The [`equinox.nn.State`][] holding this layer's running
            statistics.
        - `key`: Unused. Accepted so that every Equinox layer can be called alike.
            (Keyword only.)
        - `inference`: Overrides `self.inference` for this call when `True` or
            `False` (see [`equinox.nn.BatchNorm.__init__`][]); `None` keeps
            `self.inference`. (Keyword only.)

        **Returns:**

        A 2-tuple of:

        - The normalised array, with the shape and dtype of `x`. Statistics are
            computed in at least float32, so half-precision inputs do not overflow.
        - The updated state (unchanged in inference).

        A single value per channel in training (one example, no spatial dimensions)
        is allowed: its variance is zero, so the approaches that normalise with batch
        statistics output `bias`, and the variance accumulated is zero (not divided
        by `n - 1 = 0`).

        **Raises:**

        A `ValueError` if `x.shape[0] != input_size`. A `NameError` if no `vmap`s are
        placed around this operation, or if this vmap does not have a matching
        `axis_name`.
        """
        del key
        if x.ndim == 0 or x.shape[0] != self.input_size:
            channels = "no channel axis" if x.ndim == 0 else f"{x.shape[0]} channels"
            raise ValueError(
                f"`BatchNorm(input_size={self.input_size})` received an input of shape "
                f"{x.shape}, which has {channels}. Each example must have shape "
                "`(input_size, *spatial)`: pass `input_size` equal to the number of "
                "channels, and `vmap` over the batch axis with a matching `axis_name`."
            )
        if inference is None:
            inference = self.inference
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x.dtype, jnp.float32)
        channelwise = (slice(None),) + (None,) * (x.ndim - 1)
        y = x.astype(dtype)

        if inference:
            mean, var = self._inference_stats(state, dtype)
            centred = y - mean[channelwise]
            affine = _Affine(lax.rsqrt(var + self.eps), jnp.zeros_like(mean))
        else:
            batch = _batch_moments(y, self.axis_name)
            affine, state = self._training_step(batch, state, dtype)
            centred = batch.centred
        scale, shift = affine
        if self.weight is not None and self.bias is not None:
            weight = self.weight.astype(dtype)
            scale, shift = scale * weight, shift * weight + self.bias.astype(dtype)
        out = centred * scale[channelwise] + shift[channelwise]
        return out.astype(x.dtype), state

    def _inference_stats(self, state: State, dtype) -> _Stats:
        if self.ema_state_index is not None:
            assert self.ema_first_time_index is not None
            first_time = state.get(self.ema_first_time_index)
            mean, var = _cast(state.get(self.ema_state_index), dtype)
            return jnp.where(first_time, 0, mean), jnp.where(first_time, 1, var)
        assert self.batch_counter is not None and self.batch_state_index is not None
        step = state.get(self.batch_counter)
        hidden = _cast(state.get(self.batch_state_index), dtype)
        momentum = _momentum(self, dtype)
        return _debiased(hidden, step, momentum, _var_seed(self.approach))

    def _training_step(
        self, batch: _BatchMoments, state: State, dtype
    ) -> tuple[_Affine, State]:
        if self.ema_state_index is not None:
            assert self.ema_first_time_index is not None
            first_time = state.get(self.ema_first_time_index)
            stored = state.get(self.ema_state_index)
            running = _cast(stored, dtype)
            affine, running = _ema_legacy(
                batch, running, first_time, self.momentum, self.eps
            )
            state = state.set(self.ema_first_time_index, jnp.zeros_like(first_time))
            return affine, state.set(self.ema_state_index, _cast(running, stored))
        assert self.batch_counter is not None and self.batch_state_index is not None
        step = state.get(self.batch_counter) + 1
        stored = state.get(self.batch_state_index)
        hidden = _cast(stored, dtype)
        momentum = _momentum(self, dtype)
        if self.approach == "batch":
            affine, hidden = _batch(batch, hidden, momentum, self.eps)
        elif self.approach == "batch_renorm":
            assert self.r_max is not None and self.d_max is not None
            assert self.warmup is not None
            affine, hidden = _batch_renorm(
                batch,
                hidden,
                step,
                momentum,
                self.eps,
                self.r_max,
                self.d_max,
                self.warmup,
            )
        elif self.approach == "ema_debiased":
            affine, hidden = _ema_debiased(batch, hidden, step, momentum, self.eps)
        else:
            assert self.warmup is not None
            affine, hidden = _ema_smooth_start(
                batch, hidden, step, momentum, self.eps, self.warmup
            )
        state = state.set(self.batch_counter, step)
        return affine, state.set(self.batch_state_index, _cast(hidden, stored))


def _var_seed(approach: Approach) -> float:
    """The variance accumulator's starting value: 1 for "batch" (the 0.13 layout,
    kept so that 0.13 checkpoints load), 0 for the others."""
    return 1.0 if approach == "batch" else 0.0


def _momentum(layer: BatchNorm, dtype) -> Array:
    return jnp.asarray(layer.momentum, dtype=dtype)


def _cast(stats: _Stats, like) -> _Stats:
    """Casts (mean, var) to `like`'s dtypes, or to one dtype."""
    if isinstance(like, tuple):
        return tuple(s.astype(t.dtype) for s, t in zip(stats, like))  # pyright: ignore
    return tuple(s.astype(like) for s in stats)  # pyright: ignore


def _resolve_approach(approach: str | None, mode: str | None) -> Approach:
    if approach is not None and mode is not None:
        raise ValueError(
            "Pass only one of `BatchNorm(approach=...)` and `BatchNorm(mode=...)`: "
            f"`mode` is the older name for `approach`. Got `mode={mode!r}` and "
            f"`approach={approach!r}`; drop `mode`."
        )
    if mode is not None:
        if mode not in ("ema", "batch"):
            raise ValueError(
                f"`BatchNorm(mode=...)` must be 'ema' or 'batch', but got {mode!r}. "
                f"New code should pass `approach=` instead, one of {_APPROACHES}."
            )
        return mode  # pyright: ignore
    if approach is None:
        _warn_approach_unset()
        return "ema"
    if approach not in _APPROACHES:
        raise ValueError(
            f"Unknown `BatchNorm(approach={approach!r})`; valid approaches are "
            f"{', '.join(repr(a) for a in _APPROACHES)}."
        )
    return approach  # pyright: ignore


def _warn_approach_unset() -> None:
    # Attribute the warning to the first frame outside Equinox (and outside the
    # runtime type-checkers that may wrap its functions): the user's code.
    internal = ("equinox", "jaxtyping", "beartype")
    frame, level = sys._getframe(), 1
    while frame is not None and (
        str(frame.f_globals.get("__name__", "")).split(".")[0] in internal
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        "`eqx.nn.BatchNorm(..., approach=...)` is unspecified, so it defaults to "
        "the legacy 'ema' approach (the same as `mode='ema'`), which normalises "
        "the training forward pass with running statistics and often trains "
        "poorly (equinox issue #659). Pass `approach=` explicitly, one of "
        f"{', '.join(repr(a) for a in _APPROACHES)}; '{_RECOMMENDED}' is "
        f"recommended for new code. See {_GUIDE} for how to choose.",
        stacklevel=level,
    )


# The approach-specific options, and the approaches that use them.
_OPTIONS: dict[str, tuple[Approach, ...]] = {
    "r_max": ("batch_renorm",),
    "d_max": ("batch_renorm",),
    "warmup": ("batch_renorm", "ema_smooth_start"),
}


def _check_options(
    approach: Approach,
    *,
    momentum: float,
    eps: float,
    r_max: float | None,
    d_max: float | None,
    warmup: int | None,
) -> None:
    if not 0 < momentum < 1:
        raise ValueError(
            f"`BatchNorm(momentum=...)` must be strictly between 0 and 1, but got "
            f"{momentum!r}. It is the weight kept on the old running value: "
            "PyTorch's `momentum=0.1` is `momentum=0.9` here."
        )
    if not eps >= 0:
        raise ValueError(f"`BatchNorm(eps=...)` must be non-negative, but got {eps!r}.")
    options = {"r_max": r_max, "d_max": d_max, "warmup": warmup}
    for name, value in options.items():
        if value is not None and approach not in _OPTIONS[name]:
            owners = " or ".join(f"`approach={a!r}`" for a in _OPTIONS[name])
            raise ValueError(
                f"`BatchNorm({name}=...)` only applies to {owners}, but the approach "
                f"is {approach!r}. Remove `{name}`, or use {owners}."
            )
    for name, value, lower in (("r_max", r_max, 1), ("d_max", d_max, 0)):
        if value is not None and not value >= lower:
            raise ValueError(
                f"`BatchNorm({name}=...)` must be at least {lower}, but got {value!r}."
            )
    if warmup is not None and (
        isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0
    ):
        raise ValueError(
            "`BatchNorm(warmup=...)` must be a non-negative integer number of steps, "
            f"but got `warmup={warmup!r}`."
        )
