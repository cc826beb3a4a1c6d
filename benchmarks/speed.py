"""Speed and memory of `eqx.nn.BatchNorm` against a hand-written floor, Flax and Haiku.

Everything runs in one process, in interleaved rounds whose order rotates, and the
result is the median over rounds of each variant's time *divided by the floor's time in
the same round* (absolute times on shared machines drift; paired ratios do not).

    python benchmarks/speed.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/speed.py --quick    # smoke run (CI)
    python benchmarks/speed.py --equinox-only --approaches batch ema
                                          # runs on stock equinox 0.13.8 too

Measured: (a) one layer's training step, the jitted value-and-grad of sum(out**2) with
respect to the input and the affine parameters, both as one jitted call per step and
"in-jit" (K dependent steps inside one `lax.fori_loop`, divided by K); (b) a jitted SGD
step of a small ResNet per approach, without normalisation, and with the floor as an
Equinox layer; (c) one inference call; (d) lower+compile time; (e) XLA's temp bytes and
the number of full-size arrays in the optimised HLO.
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from markdown_table import markdown_table


DESCRIPTION = "Speed and memory of eqx.nn.BatchNorm against a floor, Flax and Haiku."
APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
EPS = 1e-5
MOMENTUM = 0.9


# --------------------------------------------------------------------------- layers
# Each variant is (params, state, init(x) -> (params, state), train(params, state, x)
# -> (out, state), infer(params, state, x) -> out), on a whole batch (N, C, *spatial).


def floor_train(params, state, x):
    """The floor: minimal two-pass batch normalisation in plain jax.numpy, with the
    plain EMA of the batch statistics that any BatchNorm keeps for inference."""
    weight, bias = params
    axes = (0,) + tuple(range(2, x.ndim))
    channel = (1, -1) + (1,) * (x.ndim - 2)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=axes)
    scale = (weight * jax.lax.rsqrt(var + EPS)).reshape(channel)
    running_mean, running_var = state
    state = (
        MOMENTUM * running_mean + (1 - MOMENTUM) * mean.reshape(-1),
        MOMENTUM * running_var + (1 - MOMENTUM) * var,
    )
    return centred * scale + bias.reshape(channel), state


def floor_infer(params, state, x):
    weight, bias = params
    mean, var = state
    channel = (1, -1) + (1,) * (x.ndim - 2)
    scale = (weight * jax.lax.rsqrt(var + EPS)).reshape(channel)
    return (x - mean.reshape(channel)) * scale + bias.reshape(channel)


def floor_variant(x):
    channels = x.shape[1]
    params = (jnp.ones(channels), jnp.zeros(channels))
    state = (jnp.zeros(channels), jnp.ones(channels))
    return params, state, floor_train, floor_infer


def equinox_variant(approach, x):
    kwargs = {"approach": approach}
    if not _fork():  # stock 0.13.8 knows only `mode=`
        kwargs = {"mode": approach}
    layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        x.shape[1], "batch", momentum=MOMENTUM, **kwargs
    )
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def train(params, state, x):
        layer = eqx.combine(params, static)
        return jax.vmap(
            layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)

    def infer(params, state, x):
        layer = eqx.nn.inference_mode(eqx.combine(params, static))
        return jax.vmap(
            layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)[0]

    return params, state, train, infer


def flax_variant(fast_variance, x):
    import flax.linen as nn

    module = nn.BatchNorm(
        use_running_average=False,
        axis=1,
        momentum=MOMENTUM,
        epsilon=EPS,
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

    return variables["params"], variables["batch_stats"], train, infer


def haiku_variant(x):
    import haiku as hk

    def forward(x, is_training):
        bn = hk.BatchNorm(True, True, MOMENTUM, eps=EPS, data_format="channels_first")
        return bn(x, is_training=is_training)

    transformed = hk.transform_with_state(forward)
    params, state = transformed.init(None, x, True)

    def train(params, state, x):
        return transformed.apply(params, state, None, x, True)

    def infer(params, state, x):
        return transformed.apply(params, state, None, x, False)[0]

    return params, state, train, infer


def _fork() -> bool:
    return "+" in eqx.__version__


def variants(x, approaches, equinox_only) -> dict[str, tuple]:
    out: dict[str, tuple] = {"floor": floor_variant(x)}
    for approach in approaches:
        out[f"eqx {approach}"] = equinox_variant(approach, x)
    if not equinox_only:
        out["flax (one-pass)"] = flax_variant(True, x)
        out["flax (two-pass)"] = flax_variant(False, x)
        out["haiku"] = haiku_variant(x)
    return out


# ------------------------------------------------------------------------ programs


def step_program(train):
    """value_and_grad of sum(out**2) w.r.t. (input, params), plus the new state."""

    def loss(x, params, state):
        out, state = train(params, state, x)
        return jnp.sum(out * out), state

    def step(x, params, state):
        (value, state), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, params, state
        )
        return value, grads, state

    return step


def loop_program(train, steps):
    """K dependent training steps in one fori_loop: each step's input depends on the
    previous step's gradient, so nothing can be hoisted."""
    step = step_program(train)

    def run(x, params, state):
        def body(_, carry):
            x, params, state = carry
            _, (gx, gp), state = step(x, params, state)
            x = x - 1e-6 * gx
            params = jax.tree_util.tree_map(lambda p, g: p - 1e-6 * g, params, gp)
            return x, params, state

        return jax.lax.fori_loop(0, steps, body, (x, params, state))

    return run


def block(tree):
    jax.block_until_ready(eqx.filter(tree, eqx.is_array))


def time_call(fn: Callable, args, repeats: int) -> float:
    out = fn(*args)
    block(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    block(out)
    return (time.perf_counter() - start) / repeats


def interleaved(programs: dict[str, tuple], rounds: int, repeats: int, scale=1.0):
    """Times every program in `rounds` rotated rounds. Returns per-name lists."""
    names = list(programs)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, args = programs[name]
            times[name].append(time_call(fn, args, repeats) * scale)
    return times


def summary(times, baseline="floor"):
    rows = []
    for name, values in times.items():
        ratios = [v / f for v, f in zip(values, times[baseline])]
        rows.append(
            (
                name,
                statistics.median(values) * 1e3,
                min(values) * 1e3,
                max(values) * 1e3,
                statistics.median(ratios),
            )
        )
    return rows


def print_table(title, rows):
    print(f"\n### {title}\n")
    header = ["variant", "median ms", "min–max ms", "paired ratio vs floor"]
    cells = [
        [name, f"{median:.3f}", f"{low:.3f}–{high:.3f}", f"{ratio:.3f}"]
        for name, median, low, high, ratio in rows
    ]
    print(markdown_table(header, cells))


# ------------------------------------------------------------------------- ResNet


class FloorNorm(eqx.Module):
    """The floor as an Equinox layer: batch statistics, and a plain EMA of them."""

    weight: jax.Array
    bias: jax.Array
    running: eqx.nn.StateIndex

    def __init__(self, channels):
        self.weight = jnp.ones(channels)
        self.bias = jnp.zeros(channels)
        self.running = eqx.nn.StateIndex((jnp.zeros(channels), jnp.ones(channels)))

    def __call__(self, x, state):
        axes = tuple(range(1, x.ndim))
        channel = (-1,) + (1,) * (x.ndim - 1)
        mean = jax.lax.pmean(jnp.mean(x, axis=axes), "batch")
        centred = x - mean.reshape(channel)
        var = jax.lax.pmean(jnp.mean(centred * centred, axis=axes), "batch")
        scale = self.weight * jax.lax.rsqrt(var + EPS)
        running_mean, running_var = state.get(self.running)
        state = state.set(
            self.running,
            (
                MOMENTUM * running_mean + (1 - MOMENTUM) * mean,
                MOMENTUM * running_var + (1 - MOMENTUM) * var,
            ),
        )
        return centred * scale.reshape(channel) + self.bias.reshape(channel), state


class NoNorm(eqx.Module):
    def __call__(self, x, state):
        return x, state


def make_norm(kind, channels):
    if kind == "none":
        return NoNorm()
    if kind == "floor":
        return FloorNorm(channels)
    kwargs = {"approach": kind} if _fork() else {"mode": kind}
    return eqx.nn.BatchNorm(channels, "batch", momentum=MOMENTUM, **kwargs)


class Block(eqx.Module):
    conv1: eqx.nn.Conv2d
    norm1: Any
    conv2: eqx.nn.Conv2d
    norm2: Any

    def __init__(self, channels, kind, key):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, key=k1
        )
        self.norm1 = make_norm(kind, channels)
        self.conv2 = eqx.nn.Conv2d(
            channels, channels, 3, padding=1, use_bias=False, key=k2
        )
        self.norm2 = make_norm(kind, channels)

    def __call__(self, x, state):
        y, state = self.norm1(self.conv1(x), state)
        y, state = self.norm2(self.conv2(jax.nn.relu(y)), state)
        return jax.nn.relu(x + y), state


class ResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    norm: Any
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, kind, width, key):
        keys = jax.random.split(key, 4)
        self.stem = eqx.nn.Conv2d(3, width, 3, padding=1, use_bias=False, key=keys[0])
        self.norm = make_norm(kind, width)
        self.blocks = [Block(width, kind, k) for k in keys[1:3]]
        self.head = eqx.nn.Linear(width, 10, key=keys[3])

    def __call__(self, x, state):
        x, state = self.norm(self.stem(x), state)
        x = jax.nn.relu(x)
        for block in self.blocks:
            x, state = block(x, state)
        return self.head(jnp.mean(x, axis=(1, 2))), state


def resnet_program(kind, width, batch, image):
    model, state = eqx.nn.make_with_state(ResNet)(kind, width, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 3, image, image))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)

    def loss(model, state, x, y):
        logits, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1)), state

    @eqx.filter_jit
    def step(model, state, x, y):
        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model, state, x, y
        )
        model = eqx.apply_updates(
            model, jax.tree_util.tree_map(lambda g: -1e-3 * g, grads)
        )
        return model, state, value

    return step, (model, state, x, y)


# --------------------------------------------------------------------------- main


def hlo_stats(compiled, shape) -> tuple[int, int]:
    """(number of instructions in the entry computation, number of them producing a
    full-size array) in the optimised HLO."""
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    lines = [line for line in entry.splitlines()[1:] if "=" in line]
    full = "[" + ",".join(map(str, shape)) + "]"
    return len(lines), sum(full in line.split("=")[1].split("(")[0] for line in lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--equinox-only", action="store_true")
    parser.add_argument("--approaches", nargs="+", default=list(APPROACHES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loop-steps", type=int, default=10)
    parser.add_argument("--resnet-width", type=int, default=16)
    parser.add_argument("--resnet-batch", type=int, default=64)
    args = parser.parse_args(argv)
    rounds, repeats, k = (args.rounds, 3, args.loop_steps)
    shapes = {
        "conv (128, 64, 16, 16)": (128, 64, 16, 16),
        "dense (256, 512)": (256, 512),
    }
    if args.quick:
        rounds, repeats, k = 2, 1, 2
        shapes = {"conv (8, 4, 4, 4)": (8, 4, 4, 4), "dense (8, 16)": (8, 16)}
    malloc = os.environ.get("MALLOC_MMAP_MAX_")
    print(
        f"# BatchNorm speed\n\n{jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, equinox {eqx.__version__}, "
        f"float32. {rounds} interleaved rounds; medians. Allocator: "
        + (f"MALLOC_MMAP_MAX_={malloc}" if malloc is not None else "glibc default")
        + "."
    )
    for label, shape in shapes.items():
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        vs = variants(x, args.approaches, args.equinox_only)
        per_call, in_jit, infer, compile_rows, memory_rows = {}, {}, {}, [], []
        for name, (params, state, train, inference) in vs.items():
            step = jax.jit(step_program(train))
            per_call[name] = (step, (x, params, state))
            in_jit[name] = (jax.jit(loop_program(train, k)), (x, params, state))
            infer[name] = (jax.jit(inference), (params, state, x))
            start = time.perf_counter()
            compiled = jax.jit(step_program(train)).lower(x, params, state).compile()
            compile_rows.append((name, time.perf_counter() - start))
            memory = compiled.memory_analysis()
            temp = getattr(memory, "temp_size_in_bytes", float("nan"))
            instructions, full = hlo_stats(compiled, shape)
            memory_rows.append((name, temp, instructions, full))
        print(f"\n## {label}")
        print_table(
            "training step, one jitted call",
            summary(interleaved(per_call, rounds, repeats)),
        )
        print_table(
            f"training step, in-jit ({k} steps per call)",
            summary(interleaved(in_jit, rounds, repeats, scale=1 / k)),
        )
        print_table(
            "inference, one jitted call", summary(interleaved(infer, rounds, repeats))
        )
        floor_temp = memory_rows[0][1]
        print("\n### compile and memory (training step)\n")
        header = [
            "variant",
            "lower+compile s",
            "XLA temp MiB",
            "temp vs floor",
            "HLO instructions",
            "full-size arrays",
        ]
        cells = [
            [
                name,
                f"{seconds:.3f}",
                f"{temp / 2**20:.2f}",
                f"{temp / floor_temp if floor_temp else float('nan'):.3f}",
                instructions,
                full,
            ]
            for (name, seconds), (_, temp, instructions, full) in zip(
                compile_rows, memory_rows
            )
        ]
        print(markdown_table(header, cells))
    width, batch, image = args.resnet_width, args.resnet_batch, 32
    if args.quick:
        width, batch, image = 4, 4, 8
    kinds = ["none", "floor"] + list(args.approaches)
    programs = {}
    for kind in kinds:
        programs[kind] = resnet_program(kind, width, batch, image)
    times = interleaved(programs, rounds, repeats)
    print(
        f"\n## ResNet SGD step (width {width}, batch {batch}, {image}x{image}, "
        "5 norm layers)\n"
    )

    # The cost of the norm layers is each round's time minus the same round's time
    # without them; the median of that, over the floor's median of that.
    def added(kind: str) -> float:
        paired = zip(times[kind], times["none"], strict=True)
        return statistics.median(t - n for t, n in paired)

    floor_added, cells = added("floor"), []
    for kind in kinds:
        cells.append(
            [
                kind,
                f"{statistics.median(times[kind]) * 1e3:.3f}",
                f"{min(times[kind]) * 1e3:.3f}–{max(times[kind]) * 1e3:.3f}",
                f"{added(kind) / floor_added:.3f}"
                if floor_added > 0
                else "n/a (the floor's cost is below the noise)",
            ]
        )
    header = ["norm", "median ms", "min–max ms", "per-layer cost vs floor layer"]
    print(markdown_table(header, cells))


if __name__ == "__main__":
    sys.exit(main())
