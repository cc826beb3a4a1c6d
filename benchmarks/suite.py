"""A benchmark suite for `eqx.nn.BatchNorm(approach=...)`, over workloads that differ
in kind.

Every approach trains at momentum 0.9 and 0.99. Each trained network is evaluated on
held-out data twice: with the running averages it kept, and with statistics recomputed
after training from 20 training batches (`eqx.nn.BatchNorm.recompute_statistics`).
Seeds are paired: a seed fixes the initialisation, the batch order and the recompute
batches of every configuration of a workload. Each configuration is compared with
`approach="batch"` at momentum 0.9 by paired differences over seeds: mean, standard
deviation, a 95% t-interval and a sign test. A difference whose interval contains 0 is
reported as within noise; where one is close to its noise (|t| >= 1 but not beyond
the interval), the two runs get more seeds, up to `--max-seeds`.

By default every workload runs on scikit-learn's bundled 8x8 digits (no download);
`--mnist DIR` runs the image workloads on MNIST's idx files instead (the 10k test
split: 8000 train / 2000 held out).

    python benchmarks/suite.py                   # ~10 minutes on 2 CPU cores
    python benchmarks/suite.py --mnist ../shared/data/mnist --out results-mnist

It prints a progress line per run and a summary with the recommendation, and writes
`results.md`, `results.json`, `delta_accuracy.png` and `curves.png` to `--out`.
"""

import argparse
import dataclasses
import gzip
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from markdown_table import markdown_table
from scipy import stats


APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
MOMENTA = (0.9, 0.99)
BASELINE = ("batch", 0.9)
NO_NORM = ("none", None)
RECOMPUTE_BATCHES = 20
# The recommendation this library makes (warning, docstring, README, guide), which
# the summary checks against the evidence of this run.
RECOMMENDED = ("batch", 0.9, True)


# Models. Each takes `norm(channels)`, which returns a BatchNorm or `NoNorm`.


class NoNorm(eqx.Module):
    def __call__(self, x, state):
        return x, state


class CNN659(eqx.Module):
    """Equinox issue #659's network: Conv2d(1, 3, 4) -> MaxPool2d(2) -> relu ->
    Linear(., 512) -> norm -> relu -> Linear(512, 64) -> relu -> Linear(64, 10)."""

    conv: eqx.nn.Conv2d
    linear1: eqx.nn.Linear
    norm: Any
    linear2: eqx.nn.Linear
    linear3: eqx.nn.Linear

    def __init__(self, norm, image_size, key):
        keys = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 3, 4, key=keys[0])
        self.linear1 = eqx.nn.Linear(3 * (image_size - 4) ** 2, 512, key=keys[1])
        self.norm = norm(512)
        self.linear2 = eqx.nn.Linear(512, 64, key=keys[2])
        self.linear3 = eqx.nn.Linear(64, 10, key=keys[3])

    def __call__(self, x, state):
        x = jax.nn.relu(eqx.nn.MaxPool2d(2)(self.conv(x)))
        x, state = self.norm(self.linear1(jnp.ravel(x)), state)
        x = jax.nn.relu(self.linear2(jax.nn.relu(x)))
        return self.linear3(x), state


class ConvNet(eqx.Module):
    """Three 3x3 convolutions, each followed by a spatial norm and relu, a max-pool
    after the first, global average pooling and a linear classifier."""

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[Any, ...]
    head: eqx.nn.Linear

    def __init__(self, norm, image_size, key):
        keys = jax.random.split(key, 4)
        widths = (1, 8, 16, 16)
        self.convs = tuple(
            eqx.nn.Conv2d(a, b, 3, padding=1, key=k)
            for a, b, k in zip(widths, widths[1:], keys)
        )
        self.norms = tuple(norm(width) for width in widths[1:])
        self.head = eqx.nn.Linear(widths[-1], 10, key=keys[3])

    def __call__(self, x, state):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x, state = norm(conv(x), state)
            x = jax.nn.relu(x)
            if i == 0:
                x = eqx.nn.MaxPool2d(2, stride=2)(x)
        return self.head(jnp.mean(x, axis=(1, 2))), state


class ResNet(eqx.Module):
    """A stem convolution and two residual blocks (conv-norm-relu-conv-norm, plus the
    identity), global average pooling and a linear classifier."""

    stem: eqx.nn.Conv2d
    stem_norm: Any
    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[Any, ...]
    head: eqx.nn.Linear

    def __init__(self, norm, image_size, key):
        keys = jax.random.split(key, 6)
        self.stem = eqx.nn.Conv2d(1, 8, 3, padding=1, key=keys[0])
        self.stem_norm = norm(8)
        self.convs = tuple(eqx.nn.Conv2d(8, 8, 3, padding=1, key=k) for k in keys[1:5])
        self.norms = tuple(norm(8) for _ in range(4))
        self.head = eqx.nn.Linear(8, 10, key=keys[5])

    def __call__(self, x, state):
        x, state = self.stem_norm(self.stem(x), state)
        x = jax.nn.relu(x)
        for block in range(2):
            (c1, c2), (n1, n2) = (
                self.convs[2 * block : 2 * block + 2],
                self.norms[2 * block : 2 * block + 2],
            )
            y, state = n1(c1(x), state)
            y, state = n2(c2(jax.nn.relu(y)), state)
            x = jax.nn.relu(x + y)
        return self.head(jnp.mean(x, axis=(1, 2))), state


class MLP(eqx.Module):
    """Flattened images -> Linear(., 128) -> norm -> relu -> Linear(128, 128) ->
    norm -> relu -> Linear(128, 10)."""

    linears: tuple[eqx.nn.Linear, ...]
    norms: tuple[Any, ...]

    def __init__(self, norm, image_size, key):
        keys = jax.random.split(key, 3)
        sizes = (image_size**2, 128, 128, 10)
        self.linears = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes, sizes[1:], keys)
        )
        self.norms = (norm(128), norm(128))

    def __call__(self, x, state):
        x = jnp.ravel(x)
        for linear, norm in zip(self.linears, self.norms):
            x, state = norm(linear(x), state)
            x = jax.nn.relu(x)
        return self.linears[-1](x), state


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: Callable[..., eqx.Module]
    batch_size: int
    optimiser: Callable[[], optax.GradientTransformation]
    steps: int
    classes_per_batch: int | None = None  # None: i.i.d. batches


WORKLOADS = (
    Workload(
        "cnn659",
        "#659's CNN, Adam(3e-3), batch 64",
        CNN659,
        64,
        lambda: optax.adam(3e-3),
        300,
    ),
    Workload(
        "small_batch",
        "#659's CNN, Adam(3e-3), batch 8",
        CNN659,
        8,
        lambda: optax.adam(3e-3),
        300,
    ),
    Workload(
        "non_iid",
        "#659's CNN, Adam(3e-3), batch 64 from 2 classes each",
        CNN659,
        64,
        lambda: optax.adam(3e-3),
        300,
        classes_per_batch=2,
    ),
    Workload(
        "sgd_convnet",
        "3 conv + spatial norm layers, SGD(0.05, momentum 0.9), batch 64",
        ConvNet,
        64,
        lambda: optax.sgd(0.05, momentum=0.9),
        300,
    ),
    Workload(
        "mlp_digits",
        "2-hidden-layer MLP with 2 norms, Adam(1e-3), batch 32, always on digits",
        MLP,
        32,
        lambda: optax.adam(1e-3),
        300,
    ),
    Workload(
        "resnet",
        "residual net: stem + 2 blocks, 5 spatial norms, Adam(1e-3), batch 32",
        ResNet,
        32,
        lambda: optax.adam(1e-3),
        300,
    ),
)


# Data.


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    digits: Any = sklearn_digits()
    images = (np.asarray(digits.images) / 16.0).astype(np.float32)
    return split(images[:, None], np.asarray(digits.target, np.int32), 0.8)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)
    )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(directory: Path):
    images = read_idx(directory / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255
    labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz").astype(np.int32)
    return split(images[:, None], labels, 0.8)


def split(images, labels, fraction):
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    cut = int(fraction * len(images))
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def batch_indices(rng, labels, workload, count):
    """`count` batches of training indices: i.i.d., or each from a few classes."""
    size = workload.batch_size
    if workload.classes_per_batch is None:
        return rng.integers(0, len(labels), (count, size))
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    out = np.empty((count, size), np.int64)
    for i in range(count):
        classes = rng.choice(10, workload.classes_per_batch, replace=False)
        pool = np.concatenate([by_class[c] for c in classes])
        out[i] = rng.choice(pool, size)
    return out


# Training and evaluation, compiled once per configuration and vmapped over seeds.


def batched(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def cross_entropy(logits, labels):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, axis=1) == labels)


def make_run(workload: Workload, data, approach: str, momentum: float | None):
    """Returns `(init, run)`: `init(seed)` builds a model and its state (eagerly: random
    initialisation inside `jit` costs seconds of compilation), and `run(params, state,
    order, recompute_order)`, compiled and vmapped over seeds, trains and evaluates."""
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    optimiser = workload.optimiser()
    size = workload.batch_size
    held_out = (len(x_test) // size) * size

    def norm(channels):
        if approach == "none":
            return NoNorm()
        return eqx.nn.BatchNorm(channels, "batch", approach=approach, momentum=momentum)

    def init(seed):
        key = jax.random.PRNGKey(seed)
        model, state = eqx.nn.make_with_state(workload.model)(
            norm, x_train.shape[-1], key
        )
        return eqx.partition(model, eqx.is_inexact_array), state

    (_, static), _ = init(0)

    def loss_fn(model, state, x, y):
        logits, state = batched(model)(x, state)
        return cross_entropy(logits, y), state

    def forward(model, state, x):
        return batched(model)(x, state)

    def run(params, state, order, recompute_order):
        opt_state = optimiser.init(params)

        def step(carry, index):
            params, state, opt_state = carry
            grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
            (loss, state), grads = grad_fn(
                eqx.combine(params, static), state, x_train[index], y_train[index]
            )
            updates, opt_state = optimiser.update(grads, opt_state, params)
            params = eqx.apply_updates(params, updates)
            return (params, state, opt_state), (loss, optax.global_norm(grads))

        (params, state, _), (losses, grad_norms) = jax.lax.scan(
            step, (params, state, opt_state), order
        )
        model = eqx.combine(params, static)
        inference = eqx.nn.inference_mode(model)

        def evaluate(state):
            logits, _ = batched(inference)(x_test, state)
            return accuracy(logits, y_test), cross_entropy(logits, y_test)

        # Train mode on held-out batches: each batch normalised by its own statistics.
        xs = x_test[:held_out].reshape((-1, size) + x_test.shape[1:])
        ys = y_test[:held_out].reshape(-1, size)
        train_mode_logits, _ = jax.vmap(batched(model), in_axes=(0, None))(xs, state)
        # Train-mode minus inference-mode loss on one training batch.
        fixed_x, fixed_y = x_train[recompute_order[0]], y_train[recompute_order[0]]
        train_mode_loss = cross_entropy(batched(model)(fixed_x, state)[0], fixed_y)

        def gap(state):
            return train_mode_loss - cross_entropy(
                batched(inference)(fixed_x, state)[0], fixed_y
            )

        acc, loss = evaluate(state)
        out = {
            "loss": losses,
            "grad_norm": grad_norms,
            "accuracy": acc,
            "held_out_loss": loss,
            "accuracy_train_mode": jnp.mean(jax.vmap(accuracy)(train_mode_logits, ys)),
            "gap": gap(state),
        }
        if approach != "none":
            recomputed = eqx.nn.BatchNorm.recompute_statistics(
                forward, model, state, x_train[recompute_order]
            )
            out["accuracy_recomputed"], out["held_out_loss_recomputed"] = evaluate(
                recomputed
            )
            out["gap_recomputed"] = gap(recomputed)
        return out

    return init, jax.jit(jax.vmap(run))


# Statistics.


def paired(values, baseline) -> dict[str, float]:
    """Paired differences over the seeds both have (seeds are added in order): mean,
    standard deviation, 95% t-interval, and a two-sided sign test."""
    n = min(len(values), len(baseline))
    d = np.asarray(values[:n], np.float64) - np.asarray(baseline[:n], np.float64)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    p = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    mean = float(d.mean())
    return dict(
        mean=mean,
        sd=sd,
        low=mean - half,
        high=mean + half,
        n=n,
        wins=wins,
        losses=losses,
        p=p,
    )


def p_value(result) -> str:
    return "p<0.001" if result["p"] < 0.001 else f"p={result['p']:.3f}"


def interval(result) -> str:
    """The mean difference and its 95% interval, in percentage points."""
    mean, low, high = (100 * result[k] for k in ("mean", "low", "high"))
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def verdict(result) -> str:
    if result["low"] > 0:
        return "better"
    if result["high"] < 0:
        return "worse"
    return "within noise"


def close_to_noise(result) -> bool:
    """|t| >= 1 but the 95% interval still contains 0."""
    if result["n"] < 2 or result["sd"] == 0:
        return False
    t = abs(result["mean"]) / (result["sd"] / np.sqrt(result["n"]))
    return t >= 1 and verdict(result) == "within noise"


# The suite.


def configurations(workload):
    """(approach, momentum) pairs trained per workload; each is evaluated with and
    without recomputed statistics. The network without normalisation is trained on
    #659's workload only, for reference."""
    first = [NO_NORM] if workload.name == "cnn659" else []
    return first + [(a, m) for m in MOMENTA for a in APPROACHES]


def evaluations(results):
    """(approach, momentum, recomputed) -> per-seed held-out accuracy."""
    out = {}
    for (approach, momentum), r in results.items():
        out[(approach, momentum, False)] = r["accuracy"]
        if "accuracy_recomputed" in r:
            out[(approach, momentum, True)] = r["accuracy_recomputed"]
    return out


def label(approach, momentum, recomputed=False):
    if approach == "none":
        return "no norm"
    return f"{approach} @{momentum}" + (" + recompute" if recomputed else "")


class Suite:
    def __init__(self, data, image_data, args):
        self.data, self.image_data, self.args = data, image_data, args
        self.runs: dict = {}  # compiled runs, reused for extra seeds
        self.results: dict = {}  # workload -> (approach, momentum) -> arrays
        self.count, self.start = 0, time.perf_counter()

    def train(self, workload, config, seeds):
        key = (workload.name, config)
        data = self.data if workload.name == "mlp_digits" else self.image_data
        if key not in self.runs:
            self.runs[key] = make_run(workload, data, *config)
        init, run = self.runs[key]
        inits, orders, recomputes = [], [], []
        index = [w.name for w in WORKLOADS].index(workload.name)
        for seed in seeds:
            rng = np.random.default_rng([seed, index])
            inits.append(init(seed))
            orders.append(batch_indices(rng, data[1], workload, workload.steps))
            recomputes.append(batch_indices(rng, data[1], workload, RECOMPUTE_BATCHES))
        params, state = jax.tree_util.tree_map(
            lambda *leaves: jnp.stack(leaves), *[(p, s) for (p, _), s in inits]
        )
        out = run(
            params,
            state,
            jnp.asarray(np.stack(orders)),
            jnp.asarray(np.stack(recomputes)),
        )
        out = jax.tree_util.tree_map(np.asarray, out)
        previous = self.results.setdefault(workload.name, {}).get(config)
        if previous is not None:
            out = {k: np.concatenate([previous[k], v]) for k, v in out.items()}
        self.results[workload.name][config] = out
        self.count += 1
        extra = (
            f", recomputed {100 * out['accuracy_recomputed'].mean():.1f}%"
            if "accuracy_recomputed" in out
            else ""
        )
        print(
            f"[{self.count}] {workload.name:>11} {label(*config):>24} seeds "
            f"{seeds[0]}-{seeds[-1]}: held-out acc {100 * out['accuracy'].mean():.1f}%"
            f"{extra}, max grad norm {out['grad_norm'].max(axis=1).mean():.3g} "
            f"({time.perf_counter() - self.start:.0f}s)",
            flush=True,
        )

    def run_workload(self, workload):
        first = list(range(self.args.seeds))
        for config in configurations(workload):
            self.train(workload, config, first)
        # More seeds where a comparison with the baseline is close to its noise.
        while True:
            results = self.results[workload.name]
            n = len(results[BASELINE]["accuracy"])
            if n >= self.args.max_seeds:
                return
            baseline = results[BASELINE]["accuracy"]
            unclear = {
                (a, m)
                for (a, m, r), acc in evaluations(results).items()
                if a in ("batch", "batch_renorm")
                and (a, m, r) != BASELINE + (False,)
                and close_to_noise(paired(acc, baseline))
            }
            if not unclear:
                return
            more = list(range(n, min(n + self.args.seeds, self.args.max_seeds)))
            for config in sorted(unclear | {BASELINE}, key=str):
                self.train(workload, config, more)


# Reporting.


def workload_table(results) -> str:
    baseline = results[BASELINE]
    rows = []
    for config, r in results.items():
        grad_max, base_max = (
            r["grad_norm"].max(axis=1),
            baseline["grad_norm"].max(axis=1),
        )
        n = min(len(grad_max), len(base_max))
        ratio = np.exp(np.mean(np.log(grad_max[:n] / base_max[:n])))
        for recomputed in (False, True):
            key = "accuracy_recomputed" if recomputed else "accuracy"
            gap = r["gap_recomputed" if recomputed else "gap"] if key in r else None
            if gap is None:
                continue
            d = paired(r[key], baseline["accuracy"])
            rows.append(
                [
                    label(config[0], config[1], recomputed),
                    f"{100 * r[key].mean():.2f} ± {100 * r[key].std(ddof=1):.2f}",
                    "–"
                    if config + (recomputed,) == BASELINE + (False,)
                    else f"{interval(d)} {d['wins']}/{d['losses']} {p_value(d)} "
                    f"({verdict(d)})",
                    f"{np.median(r['grad_norm'], axis=1).mean():.3g}",
                    f"{grad_max.mean():.3g} ({ratio:.2f}×)",
                    f"{r['loss'][:, -50:].mean():.3f}",
                    f"{np.abs(gap).mean():.3f}",
                    len(r[key]),
                ]
            )
    header = [
        "configuration",
        "held-out acc %",
        "Δ acc vs batch @0.9: mean [95% CI] wins/losses sign-p",
        "median grad norm",
        "max grad norm (geo-mean ratio)",
        "train loss, last 50",
        "|train−inference loss gap|",
        "seeds",
    ]
    return markdown_table(header, rows)


def pooled(all_results, approach, momentum, recomputed):
    """Pooled over workloads: paired Δ accuracy and max-grad-norm ratio."""
    deltas, ratios, per_workload = [], [], {}
    for name, results in all_results.items():
        r, b = results[(approach, momentum)], results[BASELINE]
        key = "accuracy_recomputed" if recomputed else "accuracy"
        n = min(len(r[key]), len(b["accuracy"]))
        d = paired(r[key][:n], b["accuracy"][:n])
        per_workload[name] = d
        deltas.extend(r[key][:n] - b["accuracy"][:n])
        ratios.extend(r["grad_norm"][:n].max(axis=1) / b["grad_norm"][:n].max(axis=1))
    total = paired(np.asarray(deltas), np.zeros(len(deltas)))
    ratio = float(np.exp(np.mean(np.log(ratios))))
    return total, ratio, per_workload


def summary(all_results) -> tuple[str, list]:
    rows, records = [], []
    for approach in APPROACHES:
        for momentum in MOMENTA:
            for recomputed in (False, True):
                if (approach, momentum, recomputed) == BASELINE + (False,):
                    continue
                total, ratio, per = pooled(all_results, approach, momentum, recomputed)
                worse = [n for n, d in per.items() if verdict(d) == "worse"]
                better = [n for n, d in per.items() if verdict(d) == "better"]
                holds = not worse and ratio <= 1.25
                records.append(
                    (
                        (approach, momentum, recomputed),
                        total,
                        ratio,
                        worse,
                        better,
                        holds,
                    )
                )
                rows.append(
                    [
                        label(approach, momentum, recomputed),
                        interval(total),
                        f"{total['wins']}/{total['losses']}, {p_value(total)}",
                        f"{ratio:.2f}",
                        ", ".join(worse) or "none",
                        ", ".join(better) or "none",
                        "yes" if holds else "no",
                    ]
                )
    header = [
        "configuration",
        "pooled Δ acc vs batch @0.9, pp [95% CI]",
        "wins/losses, sign-p",
        "max grad norm ratio (geo-mean)",
        "worse beyond noise on",
        "better beyond noise on",
        "never worse, ratio ≤ 1.25",
    ]
    return markdown_table(header, rows), records


def recommendation_text(records) -> str:
    by_config = {r[0]: r for r in records}
    config, total, ratio, worse, better, holds = by_config[RECOMMENDED]
    name = label(*RECOMMENDED)
    lines = [
        f'Recommended: {name}, i.e. `approach="batch"` and '
        "`eqx.nn.BatchNorm.recompute_statistics` after training.",
        f"Measured here, against batch @0.9 with its running averages: pooled "
        f"{interval(total)} points, {total['wins']} wins / {total['losses']} losses "
        f"(sign test {p_value(total)}); worse beyond noise on: "
        f"{', '.join(worse) or 'no workload'}; better beyond noise on: "
        f"{', '.join(better) or 'no workload'}; max gradient norm ratio {ratio:.2f} "
        "(training is exactly batch @0.9's).",
    ]
    if not holds:
        lines.append("THE RECOMMENDATION DOES NOT HOLD ON THIS RUN: see the table.")
    return "\n".join(lines)


def better_than_recommended(all_results, records) -> str:
    """Configurations that are never worse than batch @0.9, and whose pooled paired
    difference with the recommended one is positive beyond noise."""
    found = []
    for config, _, ratio, _, _, holds in records:
        if not holds or config == RECOMMENDED:
            continue
        deltas = []
        for results in all_results.values():
            key = "accuracy_recomputed" if config[2] else "accuracy"
            ours = results[config[:2]][key]
            theirs = results[RECOMMENDED[:2]]["accuracy_recomputed"]
            n = min(len(ours), len(theirs))
            deltas.extend(ours[:n] - theirs[:n])
        d = paired(np.asarray(deltas), np.zeros(len(deltas)))
        if verdict(d) == "better":
            found.append(f"{label(*config)} ({interval(d)} points)")
    if not found:
        return (
            "No configuration that is never worse than batch @0.9 beats the "
            "recommended one beyond noise."
        )
    return "Better than the recommended one beyond noise: " + "; ".join(found) + "."


def plot(all_results, records, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [r[0] for r in records]
    names = list(all_results)
    colours = [plt.get_cmap("tab10")(i) for i in range(len(names))]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.4 * len(configs) + 1.6), sharey=True, width_ratios=(3, 2)
    )
    low, high = -15.0, 6.0
    for row, (config, total, ratio, *_) in enumerate(records):
        _, _, per = pooled(all_results, *config)
        for i, name in enumerate(names):
            y = row + (i - (len(names) - 1) / 2) * 0.11
            d = {k: 100 * per[name][k] for k in ("mean", "low", "high")}
            mean = min(max(d["mean"], low), high)
            left.plot(
                [max(d["low"], low), min(d["high"], high)],
                [y, y],
                color=colours[i],
                lw=0.8,
            )
            marker = "<" if d["mean"] < low else ">" if d["mean"] > high else "o"
            left.plot(
                mean,
                y,
                marker,
                color=colours[i],
                ms=3.5,
                label=name if row == 0 else None,
            )
            r = all_results[name][config[:2]]["grad_norm"].max(axis=1)
            b = all_results[name][BASELINE]["grad_norm"].max(axis=1)
            n = min(len(r), len(b))
            right.plot(
                np.exp(np.mean(np.log(r[:n] / b[:n]))), y, "o", color=colours[i], ms=3.5
            )
        left.plot(
            min(max(100 * total["mean"], low), high),
            row,
            "D",
            color="black",
            ms=5,
            label="pooled" if row == 0 else None,
        )
        right.plot(ratio, row, "D", color="black", ms=5)
    left.axvline(0, color="grey", lw=0.8)
    left.set_xlim(low - 0.5, high + 0.5)
    left.set_yticks(range(len(configs)), [label(*c) for c in configs])
    left.invert_yaxis()
    left.set_xlabel(
        "held-out accuracy − batch @0.9's, points\n(paired by seed; 95% CI)"
    )
    left.legend(loc="lower left", fontsize=7)
    right.axvline(1, color="grey", lw=0.8)
    right.axvline(1.25, color="grey", lw=0.8, ls=":")
    right.set_xscale("log")
    right.set_xticks([1, 1.25, 2, 3, 5], ["1", "1.25", "2", "3", "5"])
    right.minorticks_off()
    right.set_xlabel("max gradient norm / batch @0.9's\n(geometric mean over seeds)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "delta_accuracy.png", dpi=110)
    plt.close(fig)

    results = all_results["cnn659"]
    fig, axes = plt.subplots(1, len(MOMENTA), figsize=(11, 3.6), sharey=True)
    window = np.ones(10) / 10
    for ax, momentum in zip(axes, MOMENTA):
        for i, config in enumerate([NO_NORM] + [(a, momentum) for a in APPROACHES]):
            curve = np.convolve(
                np.median(results[config]["grad_norm"], axis=0), window, "valid"
            )
            name = "no norm" if config == NO_NORM else config[0]
            ax.plot(curve, label=name, color=plt.get_cmap("tab10")(i), lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"cnn659 (#659's network), momentum {momentum}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("gradient norm\n(median over seeds, mean of 10 steps)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, help="folder with MNIST idx .gz files")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per round (3)")
    parser.add_argument("--max-seeds", type=int, default=9, help="at most (9)")
    parser.add_argument("--steps", type=int, help="training steps (default 300)")
    parser.add_argument("--workloads", nargs="+", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)

    digits = load_digits()
    images = load_mnist(args.mnist) if args.mnist else digits
    source = "MNIST (8000 train / 2000 held out)" if args.mnist else "digits"
    workloads = [
        dataclasses.replace(w, steps=args.steps or w.steps)
        for w in WORKLOADS
        if args.workloads is None or w.name in args.workloads
    ]
    count = sum(len(configurations(w)) for w in workloads)
    print(
        f"{len(workloads)} workloads, {count} configurations, each trained on "
        f"{args.seeds} seeds at once (a line each), then on {args.seeds} more at a "
        f"time, up to {args.max_seeds}, where a difference is close to noise; images: "
        f"{source}; bundled digits: {len(digits[0])} train / {len(digits[2])} held out",
        flush=True,
    )
    suite = Suite(digits, images, args)
    for workload in workloads:
        suite.run_workload(workload)

    table, records = summary(suite.results)
    recommendation = (
        recommendation_text(records)
        + "\n"
        + better_than_recommended(suite.results, records)
    )
    title = f"{len(workloads)} workloads, images: {source}"
    header = (
        f"jax {jax.__version__}, equinox {eqx.__version__}; {title}. Every "
        'configuration is compared with `approach="batch"` at momentum 0.9 (with its '
        'running averages), paired by seed. "+ recompute": inference statistics '
        f"recomputed from {RECOMPUTE_BATCHES} training batches after training."
    )
    details = [
        f"#### {w.name}: {w.description}\n\n{workload_table(suite.results[w.name])}\n"
        for w in workloads
    ]
    # Markdown fragments, which the guide includes; `.txt` so that they are not pages.
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.txt").write_text(f"{header}\n\n{recommendation}\n\n{table}\n")
    (args.out / "workloads.txt").write_text("\n".join(details))
    raw = {
        name: {
            label(*c): {
                k: np.round(np.asarray(v, np.float64), 5).tolist() for k, v in r.items()
            }
            for c, r in results.items()
        }
        for name, results in suite.results.items()
    }
    (args.out / "results.json").write_text(json.dumps(raw))
    if "cnn659" in suite.results:
        plot(suite.results, records, args.out, title)
    print()
    print(table)
    print()
    print(recommendation)
    print(f"\nWrote {args.out}/summary.txt, workloads.txt, results.json and the plots.")


if __name__ == "__main__":
    sys.exit(main())
