"""Speed and memory of `eqx.nn.BatchNorm` against two hand-written floors, Flax and
Haiku, and the all-reduces it needs when data-parallel.

Everything runs in one process, in interleaved rounds whose order rotates, and every
ratio is the median over rounds of a variant's time *divided by the other's time in
the same round* (absolute times on shared machines drift; paired ratios do not).

    python benchmarks/speed.py                  # full run, ~5 minutes on 2 CPU cores
    python benchmarks/speed.py --quick          # smoke run (CI)
    python benchmarks/speed.py --out benchmarks/results/speed_cpu.md
    python benchmarks/speed.py --equinox-only --approaches batch ema
                                                # runs on stock equinox 0.13.8 too

The rows (`layers.py`): the two floors, minimal batch normalisation in plain
`jax.numpy`, two-pass (the mean, then the mean squared deviation: stock Equinox's
algorithm) and one-pass (E[x^2] - E[x]^2 from one read: Flax's fast variance and
Haiku's algorithm); every approach of `eqx.nn.BatchNorm`; `approach="batch"` again with
an all-valid `mask=`; Flax linen's BatchNorm with `use_fast_variance=True` and `False`;
Haiku's. For each layer shape (`workloads.LAYER_SHAPES`) it measures:

- the training step, the jitted value-and-grad of sum(out**2) with respect to the input
  and the affine parameters: "in-jit" (K dependent steps inside one `lax.fori_loop`,
  divided by K: the layer's own cost) and as one jitted call per step (adds dispatch);
  on dense shapes, also each row's gap to the faster of Flax's fast variance and
  Haiku, paired round by round, with a 95% interval for its median;
- inference, in-jit and per call, likewise;
- lower+compile time of the training step (a fresh `jit` in each round);
- XLA's temp bytes (`compiled.memory_analysis()`), the HLO instructions and the number
  of full-size arrays in the optimised HLO of the training step.

Then the per-layer cost in a jitted SGD step of a small ResNet (`workloads.ResNet`),
and the number of all-reduces in the compiled HLO of a jit + `NamedSharding` training
step through 3 norm layers and a summed loss, on 8 CPU devices (in a subprocess, which
sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts): forward
only, and forward and backward. A `lax.cond` runs one branch, so the count walks the
HLO from its entry computation into every computation it calls, and into one branch of
each `conditional`: branch 0, the `false` branch of `lax.cond`. That is the branch
`eqx.nn.BatchNorm` takes on every step whose batch mean is within 4 batch standard
deviations of the running mean, i.e. every step after the first in practice; its
`true` branch redoes the sums around the batch mean (the first step, whose running
mean is 0). The table also gives the count when every conditional takes its costliest
branch.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import layers
import numpy as np
from layers import (
    eqx_name,
    FLAX_FAST,
    FLAX_TWO_PASS,
    HAIKU,
    ONE_PASS_FLOOR,
    TWO_PASS_FLOOR,
)
from markdown_table import markdown_table
from workloads import (
    AXIS,
    has_approach,
    LAYER_SHAPES,
    norm_factory,
    QUICK_LAYER_SHAPES,
    QUICK_RESNET_STEP,
    RESNET_STEP,
    ResNetStep,
)


DESCRIPTION = "Speed and memory of eqx.nn.BatchNorm against floors, Flax and Haiku."
APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
MASKED = ("batch",)  # approaches also measured with an all-valid mask
MOMENTUM = 0.9
FLOORS = (TWO_PASS_FLOOR, ONE_PASS_FLOOR)
# The targets of equinox issue 19 (training in-jit, inference, compile) and 18 (mask).
TARGETS = {"conv": 1.05, "dense": 1.10, "inference": 1.05, "compile": 1.3}
MASK_TARGET = 1.15
PEER_SLACK = 0.02  # dense: at most this much above the faster of Flax fast and Haiku


class Report:
    """Markdown that is printed as it is written, and saved with `--out`."""

    def __init__(self):
        self.parts: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)

    def table(self, header, rows) -> None:
        self(markdown_table(header, rows) + "\n")


# ------------------------------------------------------------------------ programs


def step_program(train):
    """value_and_grad of sum(out**2) w.r.t. (input, params), plus the new state."""

    def loss(x, params, state, *extra):
        out, state = train(params, state, x, *extra)
        return jnp.sum(out * out), state

    def step(x, params, state, *extra):
        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (value, state), grads = grad(x, params, state, *extra)
        return value, grads, state

    return step


def train_loop_program(train, steps):
    """K dependent training steps in one fori_loop: each step's input depends on the
    previous step's gradient, so nothing can be hoisted."""
    step = step_program(train)

    def run(x, params, state, *extra):
        def body(_, carry):
            x, params, state = carry
            _, (gx, gp), state = step(x, params, state, *extra)
            x = x - 1e-6 * gx
            params = jax.tree_util.tree_map(lambda p, g: p - 1e-6 * g, params, gp)
            return x, params, state

        return jax.lax.fori_loop(0, steps, body, (x, params, state))

    return run


def infer_loop_program(infer, steps):
    """K dependent inference calls in one fori_loop."""

    def run(x, params, state, *extra):
        body = lambda _, x: x + 1e-6 * infer(params, state, x, *extra)
        return jax.lax.fori_loop(0, steps, body, x)

    return run


def infer_program(infer):
    return lambda x, params, state, *extra: infer(params, state, x, *extra)


def block(tree):
    jax.block_until_ready(eqx.filter(tree, eqx.is_array))


def time_call(fn: Callable, args, repeats: int, min_time: float = 0.0) -> float:
    """Mean time of `repeats` calls, or of as many as last `min_time` seconds."""
    start = time.perf_counter()
    out = fn(*args)
    block(out)
    repeats = max(repeats, math.ceil(min_time / (time.perf_counter() - start)))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    block(out)
    return (time.perf_counter() - start) / repeats


def rotations(names, rounds):
    for r in range(rounds):
        yield names[r % len(names) :] + names[: r % len(names)]


def interleaved(
    programs: dict[str, tuple], rounds: int, repeats: int, scale=1.0, min_time=0.0
):
    """Times every program in `rounds` rotated rounds. Returns per-name lists."""
    times = {name: [] for name in programs}
    for order in rotations(list(programs), rounds):
        for name in order:
            fn, args = programs[name]
            times[name].append(time_call(fn, args, repeats, min_time) * scale)
    return times


def paired_ratio(times, name, baseline) -> float:
    """The median over rounds of `name`'s time over `baseline`'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def median_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """The median, and an interval that contains the true median with probability at
    least `level` whatever the distribution: the order statistics that a two-sided
    sign test at 1 - `level` would not reject. (-inf, inf) for too few values."""
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0  # k values in each tail of Binomial(n, 1/2), of mass <= tail
    while 2 * (tail + math.comb(n, k) / 2**n) <= 1 - level:
        tail += math.comb(n, k) / 2**n
        k += 1
    median = statistics.median(ordered)
    if k == 0:
        return median, -math.inf, math.inf
    return median, ordered[k - 1], ordered[n - k]


def peer_gaps(times) -> dict[str, tuple[float, float, float]]:
    """Each row's gap to the faster peer: per round, its time minus the peer's, over the
    two-pass floor's; of the gaps to Flax's fast variance and to Haiku, the one with
    the larger median, and a 95% interval for that median. (The faster of the two
    peers in each round would favour the peers; the faster by another statistic
    would not be the faster by this one.) Empty without peers."""
    peers = [p for p in (FLAX_FAST, HAIKU) if p in times]
    if not peers:
        return {}

    def gap(values, peer):
        rounds = zip(values, times[peer], times[TWO_PASS_FLOOR], strict=True)
        return median_interval([(t - p) / f for t, p, f in rounds])

    return {
        name: max((gap(values, p) for p in peers), key=lambda g: g[0])
        for name, values in times.items()
    }


def timing_table(report: Report, title: str, times) -> dict[str, dict[str, float]]:
    """Prints the table; returns each row's paired ratio against each floor."""
    report(f"#### {title}\n")
    header = ["variant", "median ms", "min–max ms"] + [f"vs {f}" for f in FLOORS]
    rows, ratios = [], {}
    for name, values in times.items():
        ratios[name] = {f: paired_ratio(times, name, f) for f in FLOORS}
        rows.append(
            [
                name,
                f"{statistics.median(values) * 1e3:.3f}",
                f"{min(values) * 1e3:.3f}–{max(values) * 1e3:.3f}",
                *(f"{ratios[name][f]:.3f}" for f in FLOORS),
            ]
        )
    report.table(header, rows)
    return ratios


def hlo_stats(text: str, shape) -> tuple[int, int]:
    """(number of instructions in the entry computation, number of them producing a
    full-size array) in the optimised HLO."""
    entry = text[text.index("ENTRY") :]
    lines = [line for line in entry.splitlines()[1:] if "=" in line]
    full = "[" + ",".join(map(str, shape)) + "]"
    return len(lines), sum(full in line.split("=")[1].split("(")[0] for line in lines)


# --------------------------------------------------------------------- one layer


def layer_section(report: Report, label: str, shape, args) -> dict:
    """Every measurement of one layer shape. Returns the paired ratios by table, and
    each row's gap to the faster peer in training ("peer gap")."""
    rounds, repeats, k = args.rounds, args.repeats, args.loop_steps
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    rows = layers.speed_layers(
        x, MOMENTUM, args.approaches, not args.equinox_only, MASKED
    )
    programs = {
        "train": lambda layer: jax.jit(train_loop_program(layer.train, k)),
        "train (one call)": lambda layer: jax.jit(step_program(layer.train)),
        "inference": lambda layer: jax.jit(infer_loop_program(layer.infer, k)),
        "inference (one call)": lambda layer: jax.jit(infer_program(layer.infer)),
    }
    if args.quick:  # the in-jit programs only
        programs = {key: programs[key] for key in ("train", "inference")}
    report(f"### {label}\n")
    times = {}
    for key, program in programs.items():
        timed = {
            name: (program(layer), (x, layer.params, layer.state, *layer.extra))
            for name, layer in rows.items()
        }
        scale = 1 if "one call" in key else 1 / k
        times[key] = interleaved(timed, rounds, repeats, scale, args.min_time)
    titles = {
        "train": f"training step (fwd+bwd), in-jit ({k} steps per call)",
        "train (one call)": "training step (fwd+bwd), one jitted call per step",
        "inference": f"inference, in-jit ({k} calls per call)",
        "inference (one call)": "inference, one jitted call",
    }
    ratios: dict[str, dict] = {
        key: timing_table(report, titles[key], t) for key, t in times.items()
    }
    ratios["peer gap"] = peer_gaps(times["train"])

    # Compile time: a fresh `jit` per round, so XLA compiles every round; JAX's tracing
    # caches (of `jnp` functions, of `lax.cond` branches) are warm after the first.
    compile_times = {name: [] for name in rows}
    compiled = {}
    for order in rotations(list(rows), args.compile_rounds):
        for name in order:
            layer = rows[name]
            start = time.perf_counter()
            compiled[name] = (
                jax.jit(step_program(layer.train))
                .lower(x, layer.params, layer.state, *layer.extra)
                .compile()
            )
            compile_times[name].append(time.perf_counter() - start)
    temp = {}
    for name, c in compiled.items():
        memory = c.memory_analysis()
        temp[name] = float(getattr(memory, "temp_size_in_bytes", float("nan")))
    ratios["compile"] = {
        name: {f: paired_ratio(compile_times, name, f) for f in FLOORS} for name in rows
    }
    ratios["temp bytes"] = {
        name: {f: temp[name] / temp[f] if temp[f] else float("nan") for f in FLOORS}
        for name in rows
    }
    report(
        f"#### compile and memory (training step; compile: {args.compile_rounds} "
        "rounds)\n"
    )
    header = ["variant", "lower+compile s"]
    header += [f"compile vs {f}" for f in FLOORS] + ["XLA temp MiB"]
    header += [f"temp vs {f}" for f in FLOORS]
    header += ["HLO instructions", "full-size arrays"]
    cells = []
    for name in rows:
        instructions, full = hlo_stats(compiled[name].as_text(), shape)
        cells.append(
            [
                name,
                f"{statistics.median(compile_times[name]):.3f}",
                *(f"{ratios['compile'][name][f]:.3f}" for f in FLOORS),
                f"{temp[name] / 2**20:.2f}",
                *(f"{ratios['temp bytes'][name][f]:.3f}" for f in FLOORS),
                instructions,
                full,
            ]
        )
    report.table(header, cells)

    # Masked against unmasked, paired round by round.
    masked = [a for a in MASKED if eqx_name(a, True) in rows]
    ratios["masked"] = {}
    if masked:
        report("#### the same approach with an all-valid `mask=`, over without\n")
        header = ["approach"] + list(times) + ["compile", "temp bytes"]
        cells = []
        for approach in masked:
            a, b = eqx_name(approach, True), eqx_name(approach)
            r = {key: paired_ratio(t, a, b) for key, t in times.items()}
            r["compile"] = paired_ratio(compile_times, a, b)
            r["temp bytes"] = temp[a] / temp[b] if temp[b] else float("nan")
            ratios["masked"][approach] = r
            cells.append([approach] + [f"{v:.3f}" for v in r.values()])
        report.table(header, cells)
    return ratios


# ------------------------------------------------------------------------ ResNet


def resnet_program(kind: str, config: ResNetStep):
    norm = norm_factory(kind, MOMENTUM)
    model, state = eqx.nn.make_with_state(config.model)(norm, jax.random.PRNGKey(0))
    x = jax.random.normal(
        jax.random.PRNGKey(1), (config.batch, 3, config.image, config.image)
    )
    y = jax.random.randint(jax.random.PRNGKey(2), (config.batch,), 0, 10)

    def loss(model, state, x, y):
        logits, state = jax.vmap(
            model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None)
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


def resnet_section(report: Report, config: ResNetStep, args) -> None:
    kinds = ["none", "floor"] + list(args.approaches)
    programs = {kind: resnet_program(kind, config) for kind in kinds}
    times = interleaved(programs, args.rounds, args.repeats)
    report(
        f"## ResNet SGD step (width {config.width}, batch {config.batch}, "
        f"{config.image}x{config.image}, 5 norm layers)\n"
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
                TWO_PASS_FLOOR if kind == "floor" else kind,
                f"{statistics.median(times[kind]) * 1e3:.3f}",
                f"{min(times[kind]) * 1e3:.3f}–{max(times[kind]) * 1e3:.3f}",
                f"{added(kind) / floor_added:.3f}"
                if floor_added > 0
                else "n/a (the floor's cost is below the noise)",
            ]
        )
    header = ["norm", "median ms", "min–max ms", "per-layer cost vs floor layer"]
    report.table(header, cells)


# ------------------------------------------------------------------- all-reduces

ALL_REDUCE = re.compile(r"\ball-reduce(-start)?\(")
CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
FALSE_BRANCH = re.compile(r"\bfalse_computation=%?([\w.\-]+)")
TRUE_BRANCH = re.compile(r"\btrue_computation=%?([\w.\-]+)")


def count_all_reduces(hlo: str) -> tuple[int, int, int]:
    """All-reduce instructions on the path of the compiled HLO module `hlo`, taking
    in every conditional: (branch 0, i.e. the false branch of a `lax.cond`; its
    costliest branch; its cheapest branch). Instructions in called computations
    (fusions, loops, branches) count."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif current is not None and line.startswith(" "):
            computations[current].append(line)
    memo: dict[str, tuple[int, int, int]] = {}

    def count(name: str) -> tuple[int, int, int]:
        if name not in memo:
            taken = worst = best = 0
            for line in computations.get(name, []):
                ops = line.split("=", 1)[1] if "=" in line else line
                if ALL_REDUCE.search(ops.split("metadata=")[0]):
                    taken, worst, best = taken + 1, worst + 1, best + 1
                branches = BRANCHES.search(line)
                false_branch = FALSE_BRANCH.search(line)
                if branches or false_branch:
                    if branches:
                        names = [
                            b.strip().lstrip("%") for b in branches.group(1).split(",")
                        ]
                    else:
                        true_branch = TRUE_BRANCH.search(line)
                        assert false_branch and true_branch
                        names = [false_branch.group(1), true_branch.group(1)]
                    counts = [count(b) for b in names]
                    taken += counts[0][0]
                    worst += max(c[1] for c in counts)
                    best += min(c[2] for c in counts)
                    continue
                for called in CALLED.findall(line):
                    c = count(called)
                    taken, worst, best = taken + c[0], worst + c[1], best + c[2]
            memo[name] = (taken, worst, best)
        return memo[name]

    assert entry is not None
    return count(entry)


class Stack(eqx.Module):
    """Norm layers in sequence, with relu between: the data-parallel probe."""

    norms: tuple

    def __init__(self, norm, channels, depth=3):
        self.norms = tuple(norm(channels) for _ in range(depth))

    def __call__(self, x, state, mask=None):
        for i, norm in enumerate(self.norms):
            if mask is None:
                x, state = norm(x, state)
            else:
                x, state = norm(x, state, mask=mask)
            if i < len(self.norms) - 1:
                x = jax.nn.relu(x)
        return x, state


def all_reduce_rows(approaches, peers: bool):
    """(name, kind, masked) of each row of the all-reduce table."""
    rows = [(TWO_PASS_FLOOR, "floor (two-pass)", False)]
    rows.append((ONE_PASS_FLOOR, "floor (one-pass)", False))
    rows += [(eqx_name(a), a, False) for a in approaches]
    if has_approach():
        rows += [(eqx_name(a, True), a, True) for a in MASKED if a in approaches]
    if peers:
        rows += [(FLAX_FAST, "flax", True), (FLAX_TWO_PASS, "flax", False)]
        rows += [(HAIKU, "haiku", False)]
    return rows


def _peer_loss(layer: layers.Layer):
    """sum(out) through 3 copies of a Flax or Haiku layer, on the whole batch."""

    def loss(params, state, x, mask):
        new = []
        for i, (p, s) in enumerate(zip(params, state)):
            x, s = layer.train(p, s, x)
            new.append(s)
            if i < 2:
                x = jax.nn.relu(x)
        return jnp.sum(x), new

    return loss


def _equinox_loss(static, masked: bool):
    """sum(out) through a `Stack`, under `jax.vmap(..., axis_name=AXIS)`."""

    def loss(params, state, x, mask):
        model = eqx.combine(params, static)
        call = lambda x, m: model(x, state, m if masked else None)
        y, state = jax.vmap(call, axis_name=AXIS, in_axes=(0, 0), out_axes=(0, None))(
            x, mask
        )
        return jnp.sum(y), state

    return loss


def all_reduce_probe(approaches, peers: bool, shape) -> list[dict]:
    """Runs in the subprocess with 8 CPU devices. For each row, the all-reduces of
    jit(loss) and jit(value_and_grad(loss)) through 3 norm layers, where loss sums the
    outputs and the batch is sharded over the 8 devices. Equinox layers run under
    `jax.vmap(..., axis_name=AXIS)`; Flax and Haiku on the whole batch, where XLA's
    partitioner inserts the all-reduces."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices("cpu")
    assert len(devices) >= 8, "needs --xla_force_host_platform_device_count=8"
    mesh = Mesh(np.array(devices[:8]), ("devices",))
    sharding = NamedSharding(mesh, PartitionSpec("devices"))
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), shape), sharding)
    mask = jax.device_put(jnp.ones((shape[0],) + shape[2:], bool), sharding)
    out = []
    for name, kind, option in all_reduce_rows(approaches, peers):
        if kind in ("flax", "haiku"):
            layer = (
                layers.flax(x, option, MOMENTUM)
                if kind == "flax"
                else layers.haiku(x, MOMENTUM)
            )
            params, state = [layer.params] * 3, [layer.state] * 3
            loss = _peer_loss(layer)
        else:
            model, state = eqx.nn.make_with_state(Stack)(
                norm_factory(kind, MOMENTUM), shape[1]
            )
            params, static = eqx.partition(model, eqx.is_inexact_array)
            loss = _equinox_loss(static, masked=option)
        counts = {}
        for program, fn in (
            ("fwd", loss),
            ("fwd+bwd", jax.value_and_grad(loss, has_aux=True)),
        ):
            hlo = jax.jit(fn).lower(params, state, x, mask).compile().as_text()
            counts[program] = count_all_reduces(hlo or "")
        out.append({"name": name, **counts})
    return out


def all_reduce_section(report: Report, args) -> dict:
    """Runs the probe in a subprocess with 8 CPU devices and reports its counts."""
    shape = (64, 8) if args.quick else (256, 32)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, __file__, "--all-reduce-probe", "--approaches"]
    command += list(args.approaches)
    command += ["--probe-shape", *map(str, shape)]
    if args.equinox_only or args.quick:
        command.append("--equinox-only")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise RuntimeError("the all-reduce probe failed")
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    report(
        f"## All-reduces per training step, 8 CPU devices\n\njit + `NamedSharding`, "
        f"batch {shape} sharded over a `Mesh` of 8 CPU devices, 3 norm layers (relu "
        "between) and a summed loss; all-reduce instructions in the compiled HLO. "
        "Counted on a step after the first: in a `conditional`, branch 0 (the `false` "
        "branch of `lax.cond`), which `eqx.nn.BatchNorm` takes whenever the batch mean "
        "is within 4 batch standard deviations of the running mean; in brackets, the "
        "count when every conditional takes its costliest branch (the first step, "
        "whose running mean is 0, redoes the sums around the batch mean). Equinox "
        "layers run under `jax.vmap(..., axis_name=...)`; Flax and Haiku on the "
        "whole sharded batch, where XLA's partitioner inserts the all-reduces.\n"
    )
    cells = []
    for row in rows:
        cells.append(
            [row["name"]]
            + [
                f"{row[p][0]}" + (f" ({row[p][1]})" if row[p][1] != row[p][0] else "")
                for p in ("fwd", "fwd+bwd")
            ]
        )
    report.table(["variant", "forward", "forward and backward"], cells)
    programs = ("fwd", "fwd+bwd")
    odd = [row["name"] for row in rows if any(row[p][0] != row[p][2] for p in programs)]
    if odd:
        report(
            "Branch 0 is not the cheapest branch of every conditional for: "
            f"{', '.join(odd)}; the cheapest gives "
            + "; ".join(f"{r['name']} {r['fwd'][2]} / {r['fwd+bwd'][2]}" for r in rows)
            + ".\n"
        )
    return {row["name"]: row for row in rows}


# ------------------------------------------------------------------------ summary


def summary_section(report: Report, results: dict, all_reduces: dict, args) -> None:
    """One row per approach: the headline ratios against the two-pass floor, and each
    target of issues 18 and 19 that is missed, by how much. `results` maps each layer
    shape's label to (shape, its ratios)."""
    short = {label: label.split(" (")[0] for label in results}
    if len(set(short.values())) < len(short):
        short = {label: label for label in results}
    # A target per shape: conv for spatial inputs, dense for (N, C).
    kind = {
        label: "conv" if len(shape) > 2 else "dense"
        for label, (shape, _) in results.items()
    }
    dense = [label for label in results if kind[label] == "dense"]
    report(
        "## Summary\n\nPaired ratios against the two-pass floor (in brackets: "
        "against the one-pass floor), training in-jit; − peers: per round, this row's "
        "training time minus a peer's, over the two-pass floor's: the median over "
        "rounds [a 95% interval for it, from the sign test], against whichever of "
        "Flax's fast variance and Haiku gives the larger median.\n"
    )
    header = ["variant"]
    for label in results:
        header += [f"{short[label]} {key}" for key in ("train", "inference", "compile")]
    header += [f"{short[label]} − peers" for label in dense]
    header += ["temp bytes (max)", "all-reduces fwd / fwd+bwd"]
    cells, misses, undecided = [], [], []
    names = [eqx_name(a) for a in args.approaches]
    names += [eqx_name(a, True) for a in MASKED if a in args.approaches]
    names += [FLAX_FAST, FLAX_TWO_PASS, HAIKU, ONE_PASS_FLOOR]
    for name in names:
        if not all(name in r["train"] for _, r in results.values()):
            continue
        ours = name.startswith("eqx")
        row = [name]
        for label, (_, r) in results.items():
            for key in ("train", "inference", "compile"):
                two, one = (r[key][name][f] for f in FLOORS)
                row.append(f"{two:.3f} ({one:.3f})")
                target = TARGETS[kind[label] if key == "train" else key]
                if ours and two > target:
                    misses.append(
                        f"{name}: {label} {key} {two:.3f}× the two-pass floor, "
                        f"target ≤ {target} (over by {two - target:.3f})"
                    )
        for label in dense:
            gaps = results[label][1]["peer gap"]
            if name not in gaps:
                row.append("n/a")
                continue
            gap, low, high = gaps[name]
            interval = f"{gap:+.3f} [{low:+.3f}, {high:+.3f}]"
            row.append(interval)
            if ours and high > PEER_SLACK:
                (misses if low > PEER_SLACK else undecided).append(
                    f"{name}: {label} train {interval} against the faster of Flax "
                    f"fast / Haiku, target ≤ +{PEER_SLACK}"
                )
        temps = [r["temp bytes"][name][TWO_PASS_FLOOR] for _, r in results.values()]
        row.append(f"{max(temps):.3f}")
        counts = all_reduces.get(name)
        row.append(f"{counts['fwd'][0]} / {counts['fwd+bwd'][0]}" if counts else "n/a")
        cells.append(row)
    report.table(header, cells)
    for approach in MASKED:
        for label, (_, r) in results.items():
            for key, ratio in r["masked"].get(approach, {}).items():
                if key not in ("compile", "temp bytes") and ratio > MASK_TARGET:
                    misses.append(
                        f"{eqx_name(approach, True)}: {label} {key} {ratio:.3f}× "
                        f"unmasked, target ≤ {MASK_TARGET}"
                    )
    for name in (eqx_name(a) for a in args.approaches):
        if name in all_reduces and all_reduces[name]["fwd"][0] > 4:
            misses.append(
                f"{name}: {all_reduces[name]['fwd'][0]} all-reduces in the forward, "
                "target 4 (one per layer and the loss)"
            )
    if args.quick:
        misses = undecided = ["not checked in a --quick run"]
    listed = lambda items: "".join(f"\n- {m}" for m in items) if items else " none."
    report(
        "Targets (equinox issues 18 and 19): train in-jit ≤ "
        f"{TARGETS['conv']}× (conv) and ≤ {TARGETS['dense']}× (dense) the two-pass "
        f"floor, dense within {PEER_SLACK} of the faster of Flax fast / Haiku, "
        f"inference in-jit ≤ {TARGETS['inference']}×, compile ≤ "
        f"{TARGETS['compile']}×, masked ≤ {MASK_TARGET}× unmasked (run "
        "time, in-jit and per call), 4 all-reduces in the forward. Missed in this run:"
        + listed(misses)
        + "\n\nNeither met nor missed beyond noise (the 95% interval contains the "
        f"target):{listed(undecided)}\n"
    )


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--equinox-only", action="store_true")
    parser.add_argument(
        "--approaches",
        nargs="+",
        choices=APPROACHES,
        help="default: all; --quick: batch",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="at least")
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.05,
        help="seconds each timing lasts at least (more repeats for small shapes)",
    )
    parser.add_argument("--compile-rounds", type=int, default=5)
    parser.add_argument("--loop-steps", type=int, default=10)
    parser.add_argument("--resnet-width", type=int, default=RESNET_STEP.width)
    parser.add_argument("--resnet-batch", type=int, default=RESNET_STEP.batch)
    parser.add_argument("--out", type=str, help="also write the markdown here")
    parser.add_argument(
        "--all-reduce-probe", action="store_true", help=argparse.SUPPRESS
    )
    parser.add_argument("--probe-shape", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.all_reduce_probe:
        shape = tuple(args.probe_shape)
        print(
            json.dumps(all_reduce_probe(args.approaches, not args.equinox_only, shape))
        )
        return
    shapes = LAYER_SHAPES
    resnet = ResNetStep(args.resnet_width, args.resnet_batch, RESNET_STEP.image)
    if args.quick:  # every code path, on tiny shapes, for one approach
        args.rounds, args.repeats, args.compile_rounds, args.loop_steps = 2, 1, 1, 2
        args.min_time = 0.0
        shapes, resnet = QUICK_LAYER_SHAPES, QUICK_RESNET_STEP
        args.approaches = args.approaches or ["batch"]
    args.approaches = args.approaches or list(APPROACHES)
    start = time.perf_counter()
    report = Report()
    malloc = os.environ.get("MALLOC_MMAP_MAX_")
    report(
        f"# BatchNorm speed\n\n{jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, equinox {eqx.__version__}"
        + ("" if has_approach() else " (a BatchNorm without `approach=`: stock)")
        + ", "
        f"float32. {args.rounds} interleaved rounds, each timing at least "
        f"{max(args.repeats, 1)} calls and {args.min_time} s; "
        "medians of paired ratios. "
        "Allocator: "
        + (f"MALLOC_MMAP_MAX_={malloc}" if malloc is not None else "glibc default")
        + ".\n"
    )
    all_reduces = all_reduce_section(report, args)
    results = {}
    for label, shape in shapes.items():
        results[label] = (shape, layer_section(report, label, shape, args))
    resnet_section(report, resnet, args)
    summary = Report()
    summary_section(summary, results, all_reduces, args)
    # In the file, the summary comes first.
    report.parts[1:1] = summary.parts
    report(f"Total time: {time.perf_counter() - start:.0f} s.")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report.parts).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
