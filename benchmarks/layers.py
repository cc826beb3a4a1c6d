"""One BatchNorm layer from each implementation that `speed.py` and `precision.py`
compare, behind one interface, on a whole batch `x` of shape (N, C, *spatial).

Each builder returns a `Layer`. To compare another implementation, write a builder
and add it to `speed_layers` (and to `precision.py`'s rows).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from workloads import AXIS, has_approach


EPS = 1e-5


class Layer(NamedTuple):
    params: Any
    state: Any
    # train(params, state, x, *extra) -> (out, new state), with batch statistics.
    train: Callable
    # infer(params, state, x, *extra) -> out, with the running statistics.
    infer: Callable
    # More runtime arguments of both: the mask, for a masked call. (Passed at run time
    # so that XLA cannot fold an all-valid mask away.)
    extra: tuple = ()
    # state -> the running variance per channel, as stored.
    running_var: Callable[[Any], jax.Array] | None = None


def _channel(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def floor(x, momentum: float, one_pass: bool = False, eps: float = EPS) -> Layer:
    """The floors: minimal batch normalisation in plain `jax.numpy`, with the plain EMA
    of the batch statistics that any BatchNorm keeps for inference. Two-pass: the mean,
    then the mean squared deviation, as stock Equinox and Flax's two-pass variance
    (two reads of x). One-pass: E[x^2] - E[x]^2 from one read, as Flax's fast variance
    and Haiku (not exact when |mean| >> std)."""
    channels = x.shape[1]
    params = (jnp.ones(channels), jnp.zeros(channels))
    state = (jnp.zeros(channels), jnp.ones(channels))

    def train(params, state, x):
        weight, bias = params
        channel = _channel(x)
        if one_pass:
            mean = jnp.mean(x, axis=_axes(x))
            var = jnp.maximum(jnp.mean(x * x, axis=_axes(x)) - mean * mean, 0)
            scale = weight * jax.lax.rsqrt(var + eps)
            shift = bias - mean * scale
            out = x * scale.reshape(channel) + shift.reshape(channel)
        else:
            mean = jnp.mean(x, axis=_axes(x))
            centred = x - mean.reshape(channel)
            var = jnp.mean(centred * centred, axis=_axes(x))
            scale = weight * jax.lax.rsqrt(var + eps)
            out = centred * scale.reshape(channel) + bias.reshape(channel)
        running_mean, running_var = state
        state = (
            momentum * running_mean + (1 - momentum) * mean,
            momentum * running_var + (1 - momentum) * var,
        )
        return out, state

    def infer(params, state, x):
        weight, bias = params
        mean, var = state
        channel = _channel(x)
        scale = (weight * jax.lax.rsqrt(var + eps)).reshape(channel)
        return (x - mean.reshape(channel)) * scale + bias.reshape(channel)

    return Layer(params, state, train, infer, running_var=lambda state: state[1])


def equinox(
    x, approach: str, momentum: float, masked: bool = False, eps: float = EPS
) -> Layer:
    """`eqx.nn.BatchNorm` under `jax.vmap(..., axis_name=AXIS)`; with `masked`, every
    call passes an all-valid mask of one example's spatial shape."""
    kwargs: dict[str, Any] = (
        {"approach": approach} if has_approach() else {"mode": approach}
    )
    layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        x.shape[1], AXIS, eps, momentum=momentum, **kwargs
    )
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    extra = (jnp.ones((x.shape[0],) + x.shape[2:], bool),) if masked else ()

    def run(layer, state, x, mask):
        if mask is None:
            call = lambda x, _: layer(x, state)
        else:
            call = lambda x, mask: layer(x, state, mask=mask)
        return jax.vmap(call, axis_name=AXIS, in_axes=(0, 0), out_axes=(0, None))(
            x, mask
        )

    def train(params, state, x, mask=None):
        return run(eqx.combine(params, static), state, x, mask)

    def infer(params, state, x, mask=None):
        layer = eqx.nn.inference_mode(eqx.combine(params, static))
        return run(layer, state, x, mask)[0]

    def running_var(state):
        index = layer.ema_state_index if approach == "ema" else layer.batch_state_index
        return state.get(index)[1]

    return Layer(params, state, train, infer, extra, running_var)


def flax(x, fast_variance: bool, momentum: float, eps: float = EPS) -> Layer:
    """Flax linen's BatchNorm; `use_fast_variance=True` is its default."""
    import flax.linen as nn

    module = nn.BatchNorm(
        use_running_average=False,
        axis=1,
        momentum=momentum,
        epsilon=eps,
        use_fast_variance=fast_variance,
    )
    variables = module.init(jax.random.PRNGKey(0), x)
    inference = module.copy(use_running_average=True)

    def train(params, state, x):
        out, updates = module.apply(
            {"params": params, "batch_stats": state}, x, mutable=["batch_stats"]
        )
        return out, updates["batch_stats"]

    def infer(params, state, x):
        return inference.apply({"params": params, "batch_stats": state}, x)

    return Layer(
        variables["params"],
        variables["batch_stats"],
        train,
        infer,
        running_var=lambda state: state["var"],
    )


def haiku(x, momentum: float, eps: float = EPS) -> Layer:
    """Haiku's BatchNorm (one pass, E[x^2] - E[x]^2, in the input's dtype)."""
    import haiku as hk

    def forward(x, is_training):
        bn = hk.BatchNorm(True, True, momentum, eps=eps, data_format="channels_first")
        return bn(x, is_training=is_training)

    transformed = hk.transform_with_state(forward)
    params, state = transformed.init(None, x, True)

    def train(params, state, x):
        return transformed.apply(params, state, None, x, True)

    def infer(params, state, x):
        return transformed.apply(params, state, None, x, False)[0]

    def running_var(state):
        (name,) = [k for k in state if k.endswith("var_ema")]
        return state[name]["average"].reshape(-1)

    return Layer(params, state, train, infer, running_var=running_var)


TWO_PASS_FLOOR = "floor (two-pass)"
ONE_PASS_FLOOR = "floor (one-pass)"
FLAX_FAST = "flax (fast variance)"
FLAX_TWO_PASS = "flax (two-pass)"
HAIKU = "haiku"


def eqx_name(approach: str, masked: bool = False) -> str:
    return f"eqx {approach}" + (", mask=" if masked else "")


def speed_layers(
    x, momentum: float, approaches, peers: bool = True, masked=("batch",)
) -> dict[str, Layer]:
    """The rows of the speed benchmark, by name: the two floors, every approach of
    `eqx.nn.BatchNorm`, the `masked` approaches again with an all-valid mask, and
    (with `peers`) Flax's two variances and Haiku."""
    out = {
        TWO_PASS_FLOOR: floor(x, momentum),
        ONE_PASS_FLOOR: floor(x, momentum, one_pass=True),
    }
    for approach in approaches:
        out[eqx_name(approach)] = equinox(x, approach, momentum)
    if has_approach():  # stock 0.13.8 has no mask
        for approach in masked:
            if approach in approaches:
                out[eqx_name(approach, True)] = equinox(x, approach, momentum, True)
    if peers:
        out[FLAX_FAST] = flax(x, True, momentum)
        out[FLAX_TWO_PASS] = flax(x, False, momentum)
        out[HAIKU] = haiku(x, momentum)
    return out
