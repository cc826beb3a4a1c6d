import sys
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast, get_args, Literal, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Inexact, Int, PRNGKeyArray, PyTree

from .._misc import default_floating_dtype
from .._module import field
from .._tree import tree_at
from ._misc import named_scope
from ._sequential import StatefulLayer
from ._stateful import State, StateIndex


Approach = Literal["batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start"]
_RECOMMENDED = "batch"
_GUIDE = "https://docs.kidger.site/equinox/api/nn/batch_norm_approaches/"


class _Stats(NamedTuple):
    mean: Array
    var: Array


class _Batch(NamedTuple):
    stats: _Stats  # the batch mean and biased variance
    unbiased: _Stats  # the batch mean and unbiased variance
    centred: Array  # the input minus the batch mean


class _Affine(NamedTuple):
    """The output is `centred * scale + shift`, per channel, before `weight` and
    `bias`."""

    scale: Array
    shift: Array


class BatchNorm(StatefulLayer):
    r"""Normalises each channel with statistics computed over the batch (the named
    `vmap`/`pmap`/`shard_map` axes) and all spatial dimensions, then optionally applies
    a channelwise affine transformation.

    Each channel $i$ of the input $x$ becomes

    $$\frac{x_i - \mu_i}{\sqrt{\sigma^2_i + \varepsilon}} \gamma_i + \beta_i$$

    where $\gamma, \beta$ are learnt if `channelwise_affine=True` (and are $1, 0$
    otherwise). Which statistics $\mu, \sigma^2$ are used is chosen by `approach`.

    At the $k$-th training step, with momentum $m$, let $\mu_k, \sigma^2_k$ be the
    batch mean and variance (over $n$ values per channel), $s^2_k = \frac{n}{n-1}
    \sigma^2_k$ the unbiased variance, and $\bar{x}_k = \frac{1 - m}{1 - m^k}
    \sum_{i=1}^k m^{k-i} x_i$ the running average of a statistic $x$: an exponential
    moving average, exactly debiased. Inference normalises with the running averages
    of the last training step, and with $\mu = 0, \sigma^2 = 1$ before any.

    | `approach` | training normalises with | running averages of |
    |---|---|---|
    | `"batch"` | $\mu_k, \sigma^2_k$ | $\mu, s^2$ |
    | `"batch_renorm"` | $\mu_k, \sigma^2_k$, then $r, d$ below | $\mu, s^2$ |
    | `"ema"` | $(\mu_1, \sigma^2_1)$, then $m \cdot (\text{previous}) + (1 - m) \cdot (\mu_k, \sigma^2_k)$ | the same, not debiased |
    | `"ema_debiased"` | $\bar\mu_k, \bar\sigma^2_k$ | $\mu, \sigma^2$ |
    | `"ema_smooth_start"` | $\bar{x}_k + w_k (x_k - \bar{x}_k)$ for $x = \mu, \sigma^2$ | $\mu, \sigma^2$ |

    Batch Renormalization multiplies the normalised batch by $r$ and adds $d$, which
    carry no gradient:

    $$r = \operatorname{clip}_{[1/r_{max}, r_{max}]} \sqrt{\frac{\sigma^2_k +
    \varepsilon}{\bar{s}^2_{k-1} + \varepsilon}}, \qquad d = \operatorname{clip}_{[
    -d_{max}, d_{max}]} \frac{\mu_k - \bar\mu_{k-1}}{\sqrt{\bar{s}^2_{k-1} +
    \varepsilon}}.$$

    Unclipped, this is exactly the inference output. The bounds grow linearly from
    $r_{max} = 1, d_{max} = 0$ (plain `"batch"`) over the first `warmup` steps. For
    `"ema_smooth_start"`, $w_k = m^k$, blended linearly to $1$ over the first `warmup`
    steps.

    !!! faq "Which approach should I use?"

        `approach="batch"`, and after training recompute its inference statistics with
        [`equinox.nn.BatchNorm.recompute_statistics`][]. This is the standard batch
        normalisation of PyTorch, Flax and Haiku. The `"ema"` family normalises the
        training forward pass with running averages, which scales the gradient through
        the batch statistics by $1 - m$ and causes the instability of
        [equinox issue #659](https://github.com/patrick-kidger/equinox/issues/659).
        The guide [Choosing a BatchNorm approach](batch_norm_approaches.md) has the
        measurements.

    !!! warning

        Call this layer from within a `vmap`, `pmap` or `shard_map` whose axis names
        include `axis_name`; otherwise JAX raises a `NameError`.

    !!! example

        ```python
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            64, "batch", approach="batch"
        )

        def forward(model, state, x):
            batched = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )
            return batched(x, state)

        # Data parallelism: shard the batch over the devices, and jit.
        mesh = jax.sharding.Mesh(jax.devices(), ("devices",))
        devices = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        x = jax.device_put(x, devices)  # x has shape (batch, 64, ...)
        y, state = eqx.filter_jit(forward)(bn, state, x)  # training
        y, _ = eqx.filter_jit(forward)(eqx.nn.inference_mode(bn), state, x)
        ```

        Use a mesh with `Auto` axes, as here: `jax.make_mesh`'s default `Explicit`
        axes make `State.set` fail. With `jax.shard_map` instead, name both axes,
        `BatchNorm(64, ("devices", "batch"), ...)`, and pass `check_vma=False`.

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
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    input_size: int = field(static=True)
    approach: Approach = field(static=True)
    mode: str | None = field(static=True)
    eps: float = field(static=True)
    channelwise_affine: bool = field(static=True)
    momentum: float = field(static=True)
    r_max: float | None = field(static=True)
    d_max: float | None = field(static=True)
    warmup: int | None = field(static=True)

    def __init__(
        self,
        # The positional arguments keep Equinox 0.13's order.
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = None,
        inference: bool = False,
        dtype=None,
        mode: str | None = None,
        *,
        approach: str | None = None,
        r_max: float | None = None,
        d_max: float | None = None,
        warmup: int | None = None,
    ):
        r"""**Arguments:**

        - `input_size`: How many channels each example has (the size of its first
            axis).
        - `axis_name`: The named axis (of a `jax.vmap`, `jax.pmap` or `jax.shard_map`)
            over which the batch statistics are reduced, or a sequence of such names to
            reduce over several at once.
        - `eps`: Added to the variance before its square root is taken, so that
            channels of (near) zero variance do not divide by zero.
        - `channelwise_affine`: If `True`, learn a scale $\gamma$ and an offset $\beta$
            per channel; if `False`, use $\gamma = 1, \beta = 0$.
        - `momentum`: The weight $m$ kept on the old running averages, in $(0, 1)$.
            PyTorch's `momentum=0.1` is `momentum=0.9` here. Defaults to `0.9`, or to
            `0.99` for `approach="ema"` and whenever `mode` is used, as in Equinox
            0.13.
        - `inference`: `False` to train (normalise as `approach` says and update the
            running averages), `True` to infer (normalise with the running averages and
            leave the state alone). Usually set for a whole model with
            [`equinox.nn.inference_mode`][]; a call can override it, see
            [`equinox.nn.BatchNorm.__call__`][].
        - `dtype`: The dtype of $\gamma$ and $\beta$: JAX's default floating dtype
            (float32, or float64 with `jax_enable_x64`) unless given. The running
            averages use this dtype or float32, whichever is wider.
        - `mode`: Equinox 0.13's name for `approach`, accepting `"ema"` or `"batch"`.
            It keeps 0.13's encoding of the state, so that 0.13 checkpoints load
            exactly; new code should use `approach`.
        - `approach`: One of `"batch"`, `"batch_renorm"`, `"ema"`, `"ema_debiased"`
            and `"ema_smooth_start"`; see the table above. If neither `approach` nor
            `mode` is passed, then `"ema"` is used and a warning is raised. (Keyword
            only argument.)
        - `r_max`, `d_max`: The bounds of Batch Renormalization on $r$ and $d$, for
            `approach="batch_renorm"` only. Default to `3` and `5`. (Keyword only
            arguments.)
        - `warmup`: The number of steps over which `"batch_renorm"` and
            `"ema_smooth_start"` move from pure batch statistics to their own.
            Defaults to `150` for `"batch_renorm"` and `0` for `"ema_smooth_start"`.
            (Keyword only argument.)

        **Raises:**

        A `ValueError` for an unknown `approach` or `mode`, both `approach` and `mode`,
        a `momentum` outside $(0, 1)$, a negative `eps`, or an option that the
        approach does not take.
        """
        approach = _resolve_approach(approach, mode)
        legacy = approach == "ema" or mode is not None
        momentum = (0.99 if legacy else 0.9) if momentum is None else momentum
        options = _resolve_options(
            approach, momentum, eps, r_max=r_max, d_max=d_max, warmup=warmup
        )
        dtype = default_floating_dtype() if dtype is None else dtype
        with jax.numpy_dtype_promotion("standard"):
            state_dtype = jnp.promote_types(dtype, jnp.float32)
        ones = jnp.ones((input_size,), dtype)
        self.weight = ones if channelwise_affine else None
        self.bias = jnp.zeros_like(ones) if channelwise_affine else None
        mean, var = _initial(jnp.zeros((input_size,), state_dtype))
        if approach == "ema":
            self.ema_first_time_index = StateIndex(jnp.array(True))
            self.ema_state_index = StateIndex((mean, var))
            self.batch_counter = None
            self.batch_state_index = None
        else:
            self.ema_first_time_index = None
            self.ema_state_index = None
            self.batch_counter = StateIndex(jnp.array(0))
            self.batch_state_index = StateIndex((mean, var))
        self.axis_name = axis_name
        self.inference = inference
        self.input_size = input_size
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.approach = approach
        self.mode = mode
        self.r_max = options.get("r_max")
        self.d_max = options.get("d_max")
        self.warmup = options.get("warmup")

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

        - `x`: One example, of shape `(input_size, *spatial)`, with zero or more
            spatial axes.
        - `state`: The [`equinox.nn.State`][] holding the step count and the running
            averages.
        - `key`: Unused, and accepted so that this layer can be called like any other.
            (Keyword only argument.)
        - `inference`: `True` or `False` overrides `self.inference` for this call;
            `None` uses it. See [`equinox.nn.BatchNorm.__init__`][].

        **Returns:**

        A 2-tuple of:

        - A JAX array with the shape and dtype of `x`. Statistics are computed in at
            least float32, so half-precision inputs do not overflow.
        - An updated state object (unchanged in inference).

        **Raises:**

        A `ValueError` if `x.shape[0] != input_size`. A `NameError` from JAX if the
        call is not inside a `vmap` (or `pmap`, `shard_map`) named `axis_name`.
        """
        del key
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"`BatchNorm(input_size={self.input_size})` received an input of shape "
                f"{x.shape}. Each example must have shape `(input_size, *spatial)`: "
                "pass `input_size` equal to the number of channels, and `vmap` over "
                "the batch axis with a matching `axis_name`."
            )
        if inference is None:
            inference = self.inference
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x.dtype, jnp.float32)
        y = x.astype(dtype)
        steps, running = self._load(state, dtype)
        if inference:
            centred = y - _per_channel(running.mean, y)
            affine = _normalise(running, running.mean, self.eps)
        else:
            batch = _batch_statistics(y, self.axis_name)
            momentum = jnp.asarray(self.momentum, dtype)
            options = {name: getattr(self, name) for name in _OPTIONS[self.approach]}
            strategy = _STRATEGIES[self.approach]
            affine, running = strategy(
                batch, running, steps + 1, momentum, self.eps, **options
            )
            state = self._store(state, steps + 1, running)
            centred = batch.centred
        scale, shift = affine
        if self.weight is not None and self.bias is not None:
            weight = self.weight.astype(dtype)
            scale, shift = scale * weight, shift * weight + self.bias.astype(dtype)
        out = centred * _per_channel(scale, y) + _per_channel(shift, y)
        return out.astype(x.dtype), state

    def _indices(self) -> tuple[StateIndex, StateIndex]:
        if self.approach == "ema":
            assert self.ema_first_time_index is not None
            assert self.ema_state_index is not None
            return self.ema_first_time_index, self.ema_state_index
        assert self.batch_counter is not None and self.batch_state_index is not None
        return self.batch_counter, self.batch_state_index

    def _load(self, state: State, dtype) -> tuple[Int[Array, ""], _Stats]:
        """The number of training steps taken (for `"ema"`, 0 or 1), and the running
        averages, with mean 0 and variance 1 before any step."""
        step_index, running_index = self._indices()
        steps = state.get(step_index)
        if self.approach == "ema":
            steps = jnp.where(steps, 0, 1)
        running = _Stats(*(s.astype(dtype) for s in state.get(running_index)))
        if self.mode == "batch":
            running = _from_0_13(running, steps, jnp.asarray(self.momentum, dtype))
        initial = _initial(running.mean)
        return steps, jtu.tree_map(
            lambda a, b: jnp.where(steps == 0, a, b), initial, running
        )

    def _store(self, state: State, steps: Array, running: _Stats) -> State:
        step_index, running_index = self._indices()
        if self.mode == "batch":
            momentum = jnp.asarray(self.momentum, running.mean.dtype)
            running = _to_0_13(running, steps, momentum)
        old_steps, old_running = state.get(step_index), state.get(running_index)
        new_steps = jnp.zeros_like(old_steps) if self.approach == "ema" else steps
        state = state.set(step_index, new_steps)
        return state.set(
            running_index,
            tuple(r.astype(o.dtype) for r, o in zip(running, old_running, strict=True)),
        )

    def _reset(self, state: State) -> State:
        """Returns `state` with this layer's entries as before any training step."""
        step_index, running_index = self._indices()
        steps = state.get(step_index)
        mean, _ = state.get(running_index)
        new_steps = (jnp.ones_like if self.approach == "ema" else jnp.zeros_like)(steps)
        return state.set(step_index, new_steps).set(
            running_index, tuple(_initial(mean))
        )

    @staticmethod
    def recompute_statistics(
        forward: Callable[[PyTree, State, PyTree], tuple[Any, State]],
        model: PyTree,
        state: State,
        batches: PyTree,
    ) -> State:
        r"""Recomputes the inference statistics of every `BatchNorm` in `model` as the
        exact average over `batches` ("precise batch normalisation"): the mean and the
        variance that the approach keeps of each batch (unbiased for `"batch"` and
        `"batch_renorm"`, biased for the `"ema"` family), each weighted equally.

        Running averages lag behind the network while it trains, most of all at high
        momentum. Recomputing them after training, from some twenty training batches
        pushed through the final network, removes that lag. This is what PyTorch's
        `torch.optim.swa_utils.update_bn` does.

        !!! example

            ```python
            def forward(model, state, x):
                batched = jax.vmap(
                    model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
                )
                return batched(x, state)

            xs = x_train[:20 * 64].reshape(20, 64, *x_train.shape[1:])
            state = eqx.filter_jit(eqx.nn.BatchNorm.recompute_statistics)(
                forward, model, state, xs
            )
            inference_model = eqx.nn.inference_mode(model)
            ```

        **Arguments:**

        - `forward`: Called as `forward(model, state, batch)` for each batch; returns
            a pair whose second element is the new state, like a stateful model. It
            must call `model` (not another copy of it), once per batch, with the batch
            axis named as the `BatchNorm`s expect.
        - `model`: A PyTree containing one or more `BatchNorm`s. They run in training
            mode, whatever their `inference` flag; everything else runs as given (so
            pass [`equinox.nn.inference_mode`][]`(model)` to switch dropout off).
        - `state`: The [`equinox.nn.State`][] of `model`.
        - `batches`: A PyTree of arrays whose leading axis indexes the batches, e.g.
            an array of shape `(num_batches, batch_size, ...)`.

        **Returns:**

        A new state in which each `BatchNorm`'s entries hold the recomputed
        statistics, as after one training step. Every other entry is unchanged.

        **Raises:**

        A `ValueError` if `model` contains no `BatchNorm`, or if `forward` does not
        run them in training mode.
        """
        is_layer = lambda x: isinstance(x, BatchNorm)
        layers = [x for x in jtu.tree_leaves(model, is_leaf=is_layer) if is_layer(x)]
        if len(layers) == 0:
            raise ValueError(
                "`BatchNorm.recompute_statistics(forward, model, ...)` found no "
                "`BatchNorm` in `model`."
            )
        training = jtu.tree_map(
            lambda x: tree_at(lambda b: b.inference, x, False) if is_layer(x) else x,
            model,
            is_leaf=is_layer,
        )
        reset = _copy(state)
        for layer in layers:
            reset = layer._reset(reset)
        indices = [index for layer in layers for index in layer._indices()]

        def one_batch(batch):
            start = _copy(reset)
            _, new_state = forward(training, start, batch)
            entries = [new_state.get(index) for index in indices]
            if any(new is start.get(i) for new, i in zip(entries, indices)):
                raise ValueError(
                    "`BatchNorm.recompute_statistics(forward, model, ...)`: `forward` "
                    "did not update the `BatchNorm` state. It must call the `model` "
                    "it is given (which runs `BatchNorm` in training mode), and return "
                    "the new state as the second element of a pair."
                )
            return entries

        entries = lax.map(one_batch, batches)
        state = _copy(state)
        for index, stacked in zip(indices, entries):
            state = state.set(index, jtu.tree_map(_average_batches, stacked))
        return state


def _batch(
    batch: _Batch, running: _Stats, step: Array, momentum: Array, eps: float
) -> tuple[_Affine, _Stats]:
    return _normalise(batch.stats, batch.stats.mean, eps), _running_average(
        running, batch.unbiased, step, momentum
    )


def _batch_renorm(
    batch: _Batch,
    running: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    r_max: float,
    d_max: float,
    warmup: int,
) -> tuple[_Affine, _Stats]:
    # On the first step the bounds are (1, 0), so r = 1 and d = 0 whatever the
    # running averages (which are still mean 0, variance 1).
    t = _warmup_fraction(step, warmup, momentum.dtype)
    r_bound, d_bound = 1 + (r_max - 1) * t, d_max * t
    std = jnp.sqrt(batch.stats.var + eps)
    running_std = jnp.sqrt(running.var + eps)
    r = jnp.clip(std / running_std, 1 / r_bound, r_bound)
    d = jnp.clip((batch.stats.mean - running.mean) / running_std, -d_bound, d_bound)
    affine = _Affine(lax.stop_gradient(r) / std, lax.stop_gradient(d))
    return affine, _running_average(running, batch.unbiased, step, momentum)


def _ema(
    batch: _Batch, running: _Stats, step: Array, momentum: Array, eps: float
) -> tuple[_Affine, _Stats]:
    keep = jnp.where(step == 1, 0, momentum)
    running = _blend(running, batch.stats, keep)
    return _normalise(running, batch.stats.mean, eps), running


def _ema_debiased(
    batch: _Batch, running: _Stats, step: Array, momentum: Array, eps: float
) -> tuple[_Affine, _Stats]:
    running = _running_average(running, batch.stats, step, momentum)
    return _normalise(running, batch.stats.mean, eps), running


def _ema_smooth_start(
    batch: _Batch,
    running: _Stats,
    step: Array,
    momentum: Array,
    eps: float,
    warmup: int,
) -> tuple[_Affine, _Stats]:
    running = _running_average(running, batch.stats, step, momentum)
    t = _warmup_fraction(step, warmup, momentum.dtype)
    keep = t * (1 - momentum ** step.astype(momentum.dtype))
    stats = _blend(running, batch.stats, keep)
    return _normalise(stats, batch.stats.mean, eps), running


_STRATEGIES: dict[Approach, Callable[..., tuple[_Affine, _Stats]]] = {
    "batch": _batch,
    "batch_renorm": _batch_renorm,
    "ema": _ema,
    "ema_debiased": _ema_debiased,
    "ema_smooth_start": _ema_smooth_start,
}
# The options that each approach takes, with their defaults.
_OPTIONS: dict[Approach, dict[str, float | int]] = {
    "batch": {},
    "batch_renorm": {"r_max": 3.0, "d_max": 5.0, "warmup": 150},
    "ema": {},
    "ema_debiased": {},
    "ema_smooth_start": {"warmup": 0},
}


def _running_average(
    running: _Stats, new: _Stats, step: Array, momentum: Array
) -> _Stats:
    # x̄_k = x_k + c_k (x̄_{k-1} - x_k), with c_k = (m - m^k) / (1 - m^k): exactly 0 at
    # k = 1, so the first batch replaces the initial (0, 1) exactly.
    log_m = jnp.log(momentum)
    k = step.astype(log_m.dtype)
    return _blend(
        running, new, momentum * jnp.expm1((k - 1) * log_m) / jnp.expm1(k * log_m)
    )


def _blend(running: _Stats, new: _Stats, keep: Array) -> _Stats:
    """`keep * running + (1 - keep) * new`, written so that a batch equal to the running
    statistics leaves them exactly unchanged."""
    return jtu.tree_map(lambda r, n: n + keep * (r - n), running, new)


def _warmup_fraction(step: Array, warmup: int, dtype) -> Array:
    """0 on the first step, rising linearly to 1 at step `warmup + 1` (at step 2 for
    `warmup=0`)."""
    return jnp.minimum(1, (step - 1) / max(warmup, 1)).astype(dtype)


def _normalise(stats: _Stats, reference: Array, eps: float) -> _Affine:
    """`(x - stats.mean) / sqrt(stats.var + eps)`, as an affine map of
    `x - reference`."""
    scale = lax.rsqrt(stats.var + eps)
    return _Affine(scale, (reference - stats.mean) * scale)


def _batch_statistics(x: Array, axis_name: Hashable | Sequence[Hashable]) -> _Batch:
    # Two passes (the mean, then the mean squared deviation), which stays accurate
    # when the mean is large compared to the spread.
    spatial = tuple(range(1, x.ndim))
    mean = lax.pmean(jnp.mean(x, axis=spatial), axis_name)
    centred = x - _per_channel(mean, x)
    squares = (centred * jnp.conj(centred)).real
    var = lax.pmean(jnp.mean(squares, axis=spatial), axis_name).astype(x.dtype)
    n = lax.psum(1, axis_name) * (x.size // x.shape[0])
    unbiased = var * (n / max(n - 1, 1))
    return _Batch(_Stats(mean, var), _Stats(mean, unbiased), centred)


def _from_0_13(hidden: _Stats, steps: Array, momentum: Array) -> _Stats:
    # Equinox 0.13's `mode="batch"` stores h_k = m^k (0, 1) + (1 - m^k) x̄_k: an
    # exponential moving average started at mean 0 and variance 1.
    decay, weight = _decay(steps, momentum)
    return _Stats(hidden.mean / weight, (hidden.var - decay) / weight)


def _to_0_13(running: _Stats, steps: Array, momentum: Array) -> _Stats:
    decay, weight = _decay(steps, momentum)
    return _Stats(running.mean * weight, running.var * weight + decay)


def _decay(steps: Array, momentum: Array) -> tuple[Array, Array]:
    """`m**k` and `1 - m**k`, the latter to full relative precision."""
    k_log_m = steps.astype(momentum.dtype) * jnp.log(momentum)
    return jnp.exp(k_log_m), -jnp.expm1(k_log_m)


def _initial(like: Array) -> _Stats:
    """The statistics before any training step: mean 0, variance 1."""
    return _Stats(jnp.zeros_like(like), jnp.ones_like(like))


def _per_channel(values: Array, like: Array) -> Array:
    return jnp.expand_dims(values, tuple(range(1, like.ndim)))


def _copy(state: State) -> State:
    # `State.set` invalidates the object it is called on; this keeps the original.
    return jtu.tree_map(lambda x: x, state)


def _average_batches(stacked: Array) -> Array:
    # Counters and flags are equal across batches; floating statistics are averaged.
    if jnp.issubdtype(stacked.dtype, jnp.inexact):
        return jnp.mean(stacked, axis=0)
    return stacked[0]


def _resolve_approach(approach: str | None, mode: str | None) -> Approach:
    choices = ", ".join(repr(a) for a in get_args(Approach))
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
                f"New code should pass `approach=` instead, one of {choices}."
            )
        return mode
    if approach is None:
        _warn_approach_unset(choices)
        return "ema"
    if approach not in get_args(Approach):
        raise ValueError(
            f"Unknown `BatchNorm(approach={approach!r})`; valid approaches are "
            f"{choices}."
        )
    return cast(Approach, approach)


def _warn_approach_unset(choices: str) -> None:
    # Attribute the warning to the first frame outside Equinox (and outside the
    # runtime type-checkers that may wrap its functions): the user's code.
    internal = ("equinox", "jaxtyping", "beartype")
    frame, level = sys._getframe(), 1
    while frame is not None and (
        str(frame.f_globals.get("__name__", "")).split(".")[0] in internal
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        "`eqx.nn.BatchNorm(..., approach=...)` is unspecified, so it defaults to the "
        "legacy 'ema' approach (the same as `mode='ema'`), which normalises the "
        "training forward pass with running averages and often trains poorly (equinox "
        f"issue #659). Pass `approach=` explicitly, one of {choices}. "
        f"'{_RECOMMENDED}' is recommended, with "
        "`eqx.nn.BatchNorm.recompute_statistics` after training for exact inference "
        f"statistics. See {_GUIDE} for how to choose.",
        stacklevel=level,
    )


def _resolve_options(
    approach: Approach, momentum: float, eps: float, **given: int | float | None
) -> dict[str, Any]:
    """Checks `momentum`, `eps` and the approach's options; returns the options with
    their defaults filled in."""
    if not 0 < momentum < 1:
        raise ValueError(
            f"`BatchNorm(momentum=...)` must be strictly between 0 and 1, but got "
            f"{momentum!r}. It is the weight kept on the old running average: "
            "PyTorch's `momentum=0.1` is `momentum=0.9` here."
        )
    if not eps >= 0:
        raise ValueError(f"`BatchNorm(eps=...)` must be non-negative, but got {eps!r}.")
    defaults = _OPTIONS[approach]
    for name, value in given.items():
        if value is not None and name not in defaults:
            owners = " or ".join(
                f"`approach={a!r}`" for a, o in _OPTIONS.items() if name in o
            )
            raise ValueError(
                f"`BatchNorm({name}=...)` only applies to {owners}, but the approach "
                f"is {approach!r}. Remove `{name}`, or use {owners}."
            )
    options = dict(defaults)
    options.update((k, v) for k, v in given.items() if v is not None)
    for name, lower in (("r_max", 1), ("d_max", 0)):
        if name in options and not options[name] >= lower:
            raise ValueError(
                f"`BatchNorm({name}=...)` must be at least {lower}, but got "
                f"{options[name]!r}."
            )
    warmup = options.get("warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(
            "`BatchNorm(warmup=...)` must be a non-negative integer number of steps, "
            f"but got `warmup={warmup!r}`."
        )
    return options
