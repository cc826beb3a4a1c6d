"""A benchmark suite for `eqx.nn.BatchNorm(approach=...)`, over workloads that differ
in kind.

Every approach trains at momentum 0.9 and 0.99. Each trained network is evaluated on
held-out data twice: with the running averages it kept, and with statistics recomputed
after training from 20 training batches (`eqx.nn.recompute_batch_norm_statistics`).
Seeds are paired: a seed fixes the initialisation, the batch order and the recompute
batches of every configuration of a workload. Each configuration is compared with
`approach="batch"` at momentum 0.9 by paired differences over seeds: mean, standard
deviation, a 95% t-interval and a sign test. A difference whose interval contains 0 is
reported as within noise; where one is close to its noise (|t| >= 1 but not beyond
the interval), the two runs get more seeds, up to `--max-seeds`.

By default every workload runs on scikit-learn's bundled 8x8 digits (no download);
`--mnist DIR` runs the image workloads on MNIST's idx files instead (the 10k test
split: 8000 train / 2000 held out).

    python benchmarks/suite.py                   # ~13 minutes on 2 CPU cores
    python benchmarks/suite.py --mnist ../shared/data/mnist --out results-mnist

It prints a progress line per run and a summary with the recommendation, and writes
`summary.txt`, `workloads.txt`, `results.json`, `delta_accuracy.png` and `curves.png`
to `--out`. The workloads and models are in `workloads.py` (one entry adds a
workload), the figures in `plots.py`.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import plots
from markdown_table import markdown_table
from scipy import stats
from workloads import (
    AXIS,
    batch_indices,
    load_digits,
    load_mnist,
    norm_factory,
    Workload,
    WORKLOADS,
)


class Config(NamedTuple):
    """A trained configuration."""

    approach: str  # an approach of eqx.nn.BatchNorm, or "none"
    momentum: float | None


class Evaluation(NamedTuple):
    """A trained configuration, evaluated with its running averages or with
    recomputed statistics."""

    approach: str
    momentum: float | None
    recomputed: bool


APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
MOMENTA = (0.9, 0.99)
BASELINE = Config("batch", 0.9)
BASELINE_EVALUATION = Evaluation(*BASELINE, recomputed=False)
NO_NORM = Config("none", None)
RECOMPUTE_BATCHES = 20
# The recommendation this library makes (warning, docstring, README, guide), which
# the summary checks against the evidence of this run.
RECOMMENDED = Evaluation("batch", 0.9, recomputed=True)


# Training and evaluation, compiled once per configuration and vmapped over seeds.


def batched(model):
    return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))


def forward(model, state, x):
    """The forward pass over a batch that the statistics are recomputed with."""
    return batched(model)(x, state)


def cross_entropy(logits, labels):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, axis=1) == labels)


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, count):
    return [jax.tree_util.tree_map(lambda leaf: leaf[i], tree) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of one workload, compiled once and reused for more seeds.

    `init(seed)` builds a model's parameters and state (eagerly: random initialisation
    inside `jit` costs seconds of compilation). `train(params, state, order)` and
    `evaluate(params, state, recomputed, recompute_order)` are compiled and vmapped
    over seeds; `recompute` runs outside `jit`, one seed at a time."""

    config: Config
    init: Callable
    train: Callable
    evaluate: Callable
    static: Any
    x_train: jax.Array

    def recompute(self, params, state, recompute_order):
        """Statistics recomputed per seed with `eqx.nn.recompute_batch_norm_statistics`,
        which is called outside `jit` (it compiles its own step), stacked over seeds."""
        count = len(recompute_order)
        return stack(
            [
                eqx.nn.recompute_batch_norm_statistics(
                    forward, eqx.combine(p, self.static), s, self.x_train[order]
                )
                for p, s, order in zip(
                    unstack(params, count), unstack(state, count), recompute_order
                )
            ]
        )

    def __call__(self, seeds, orders, recompute_orders) -> dict[str, np.ndarray]:
        params, state = stack([self.init(seed) for seed in seeds])
        params, state, losses, grad_norms = self.train(params, state, orders)
        recomputed = None
        if self.config != NO_NORM:
            recomputed = self.recompute(params, state, recompute_orders)
        evaluated = self.evaluate(params, state, recomputed, recompute_orders)
        out = {"loss": losses, "grad_norm": grad_norms, **evaluated}
        return jax.tree_util.tree_map(np.asarray, out)


def make_run(workload: Workload, data, config: Config) -> Run:
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    optimiser = workload.optimiser()
    size = workload.batch_size
    held_out = (len(x_test) // size) * size
    norm = norm_factory(*config)

    def build(seed):
        key = jax.random.PRNGKey(seed)
        model, state = eqx.nn.make_with_state(workload.model)(
            norm, x_train.shape[-1], key
        )
        return eqx.partition(model, eqx.is_inexact_array), state

    (_, static), _ = build(0)

    def init(seed):
        (params, _), state = build(seed)
        return params, state

    def loss_fn(model, state, x, y):
        logits, state = batched(model)(x, state)
        return cross_entropy(logits, y), state

    def train(params, state, order):
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
        return params, state, losses, grad_norms

    def evaluate(params, state, recomputed, recompute_order):
        model = eqx.combine(params, static)
        inference = eqx.nn.inference_mode(model)

        def on_test_set(state):
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

        acc, loss = on_test_set(state)
        out = {
            "accuracy": acc,
            "held_out_loss": loss,
            "accuracy_train_mode": jnp.mean(jax.vmap(accuracy)(train_mode_logits, ys)),
            "gap": gap(state),
        }
        if recomputed is not None:
            out["accuracy_recomputed"], out["held_out_loss_recomputed"] = on_test_set(
                recomputed
            )
            out["gap_recomputed"] = gap(recomputed)
        return out

    return Run(
        config,
        init,
        jax.jit(jax.vmap(train)),
        jax.jit(jax.vmap(evaluate)),
        static,
        x_train,
    )


# Statistics.


class Difference(NamedTuple):
    """Paired differences over seeds: mean, standard deviation, 95% t-interval
    [low, high], number of pairs, wins, losses and the two-sided sign test's p."""

    mean: float
    sd: float
    low: float
    high: float
    n: int
    wins: int
    losses: int
    p: float


def paired(values, baseline) -> Difference:
    """Paired differences over the seeds both have (seeds are added in order)."""
    n = min(len(values), len(baseline))
    d = np.asarray(values[:n], np.float64) - np.asarray(baseline[:n], np.float64)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    p = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    mean = float(d.mean())
    return Difference(mean, sd, mean - half, mean + half, n, wins, losses, p)


def p_value(d: Difference) -> str:
    return "p<0.001" if d.p < 0.001 else f"p={d.p:.3f}"


def interval(d: Difference) -> str:
    """The mean difference and its 95% interval, in percentage points."""
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]"


def verdict(d: Difference) -> str:
    if d.low > 0:
        return "better"
    if d.high < 0:
        return "worse"
    return "within noise"


def close_to_noise(d: Difference) -> bool:
    """|t| >= 1 but the 95% interval still contains 0."""
    if d.n < 2 or d.sd == 0:
        return False
    t = abs(d.mean) / (d.sd / np.sqrt(d.n))
    return t >= 1 and verdict(d) == "within noise"


def grad_norm_ratio(results, baseline) -> float:
    """Geometric mean over paired seeds of max gradient norm / the baseline's."""
    r, b = results["grad_norm"].max(axis=1), baseline["grad_norm"].max(axis=1)
    n = min(len(r), len(b))
    return float(np.exp(np.mean(np.log(r[:n] / b[:n]))))


# The suite.


def configurations(workload: Workload) -> list[Config]:
    """The configurations trained per workload; each is evaluated with and without
    recomputed statistics. The network without normalisation is trained, for
    reference, on the workloads that ask for it."""
    first = [NO_NORM] if workload.reference_without_norm else []
    return first + [Config(a, m) for m in MOMENTA for a in APPROACHES]


def evaluations(results) -> dict[Evaluation, np.ndarray]:
    """Per-seed held-out accuracy of every evaluation of a workload's configurations."""
    out = {}
    for config, r in results.items():
        out[Evaluation(*config, recomputed=False)] = r["accuracy"]
        if "accuracy_recomputed" in r:
            out[Evaluation(*config, recomputed=True)] = r["accuracy_recomputed"]
    return out


def label(approach, momentum, recomputed=False):
    if approach == "none":
        return "no norm"
    return f"{approach} @{momentum}" + (" + recompute" if recomputed else "")


class Suite:
    def __init__(self, data, image_data, args):
        self.data, self.image_data, self.args = data, image_data, args
        self.runs: dict[tuple[str, Config], Run] = {}  # reused for extra seeds
        self.results: dict[str, dict[Config, dict[str, np.ndarray]]] = {}
        self.count, self.start = 0, time.perf_counter()

    def train(self, workload: Workload, config: Config, seeds):
        key = (workload.name, config)
        data = self.image_data if workload.on_mnist else self.data
        if key not in self.runs:
            self.runs[key] = make_run(workload, data, config)
        orders, recomputes = [], []
        index = [w.name for w in WORKLOADS].index(workload.name)
        for seed in seeds:
            rng = np.random.default_rng([seed, index])
            orders.append(batch_indices(rng, data[1], workload, workload.steps))
            recomputes.append(batch_indices(rng, data[1], workload, RECOMPUTE_BATCHES))
        out = self.runs[key](
            seeds, jnp.asarray(np.stack(orders)), jnp.asarray(np.stack(recomputes))
        )
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

    def run_workload(self, workload: Workload):
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
                Config(e.approach, e.momentum)
                for e, acc in evaluations(results).items()
                if e.approach in ("batch", "batch_renorm")
                and e != BASELINE_EVALUATION
                and close_to_noise(paired(acc, baseline))
            }
            if not unclear:
                return
            more = list(range(n, min(n + self.args.seeds, self.args.max_seeds)))
            for config in sorted(unclear | {BASELINE}, key=lambda c: str(tuple(c))):
                self.train(workload, config, more)


# Reporting.


def workload_table(results) -> str:
    baseline = results[BASELINE]
    rows = []
    for config, r in results.items():
        grad_max = r["grad_norm"].max(axis=1)
        ratio = grad_norm_ratio(r, baseline)
        for recomputed in (False, True):
            key = "accuracy_recomputed" if recomputed else "accuracy"
            gap = r["gap_recomputed" if recomputed else "gap"] if key in r else None
            if gap is None:
                continue
            d = paired(r[key], baseline["accuracy"])
            rows.append(
                [
                    label(config.approach, config.momentum, recomputed),
                    f"{100 * r[key].mean():.2f} ± {100 * r[key].std(ddof=1):.2f}",
                    "–"
                    if Evaluation(config.approach, config.momentum, recomputed)
                    == BASELINE_EVALUATION
                    else f"{interval(d)} {d.wins}/{d.losses} {p_value(d)} "
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


class Pooled(NamedTuple):
    """An evaluation against the baseline, pooled over workloads and per workload."""

    evaluation: Evaluation
    difference: Difference  # Δ accuracy over every workload's paired seeds
    ratio: float  # max gradient norm ratio, geometric mean over the same pairs
    per_workload: dict[str, Difference]
    worse: list[str]  # workloads where it is worse beyond noise
    better: list[str]
    holds: bool  # never worse beyond noise, and ratio <= 1.25


def pooled(all_results, evaluation: Evaluation) -> Pooled:
    """Pooled over workloads: paired Δ accuracy and max-grad-norm ratio."""
    deltas, ratios, per_workload = [], [], {}
    key = "accuracy_recomputed" if evaluation.recomputed else "accuracy"
    for name, results in all_results.items():
        r = results[Config(evaluation.approach, evaluation.momentum)]
        b = results[BASELINE]
        n = min(len(r[key]), len(b["accuracy"]))
        per_workload[name] = paired(r[key][:n], b["accuracy"][:n])
        deltas.extend(r[key][:n] - b["accuracy"][:n])
        ratios.extend(r["grad_norm"][:n].max(axis=1) / b["grad_norm"][:n].max(axis=1))
    total = paired(np.asarray(deltas), np.zeros(len(deltas)))
    ratio = float(np.exp(np.mean(np.log(ratios))))
    worse = [n for n, d in per_workload.items() if verdict(d) == "worse"]
    better = [n for n, d in per_workload.items() if verdict(d) == "better"]
    holds = not worse and ratio <= 1.25
    return Pooled(evaluation, total, ratio, per_workload, worse, better, holds)


def summary(all_results) -> tuple[str, list[Pooled]]:
    rows, records = [], []
    for approach in APPROACHES:
        for momentum in MOMENTA:
            for recomputed in (False, True):
                evaluation = Evaluation(approach, momentum, recomputed)
                if evaluation == BASELINE_EVALUATION:
                    continue
                record = pooled(all_results, evaluation)
                records.append(record)
                total = record.difference
                rows.append(
                    [
                        label(*evaluation),
                        interval(total),
                        f"{total.wins}/{total.losses}, {p_value(total)}",
                        f"{record.ratio:.2f}",
                        ", ".join(record.worse) or "none",
                        ", ".join(record.better) or "none",
                        "yes" if record.holds else "no",
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


def recommendation_text(records: list[Pooled]) -> str:
    r = next(r for r in records if r.evaluation == RECOMMENDED)
    total = r.difference
    lines = [
        f'Recommended: {label(*RECOMMENDED)}, i.e. `approach="batch"` and '
        "`eqx.nn.recompute_batch_norm_statistics` after training.",
        f"Measured here, against batch @0.9 with its running averages: pooled "
        f"{interval(total)} points, {total.wins} wins / {total.losses} losses "
        f"(sign test {p_value(total)}); worse beyond noise on: "
        f"{', '.join(r.worse) or 'no workload'}; better beyond noise on: "
        f"{', '.join(r.better) or 'no workload'}; max gradient norm ratio "
        f"{r.ratio:.2f} (training is exactly batch @0.9's).",
    ]
    if not r.holds:
        lines.append("THE RECOMMENDATION DOES NOT HOLD ON THIS RUN: see the table.")
    return "\n".join(lines)


def better_than_recommended(all_results, records: list[Pooled]) -> str:
    """Configurations that are never worse than batch @0.9, and whose pooled paired
    difference with the recommended one is positive beyond noise."""
    found = []
    for record in records:
        evaluation = record.evaluation
        if not record.holds or evaluation == RECOMMENDED:
            continue
        deltas = []
        key = "accuracy_recomputed" if evaluation.recomputed else "accuracy"
        for results in all_results.values():
            ours = results[Config(evaluation.approach, evaluation.momentum)][key]
            theirs = results[Config(RECOMMENDED.approach, RECOMMENDED.momentum)][
                "accuracy_recomputed"
            ]
            n = min(len(ours), len(theirs))
            deltas.extend(ours[:n] - theirs[:n])
        d = paired(np.asarray(deltas), np.zeros(len(deltas)))
        if verdict(d) == "better":
            found.append(f"{label(*evaluation)} ({interval(d)} points)")
    if not found:
        return (
            "No configuration that is never worse than batch @0.9 beats the "
            "recommended one beyond noise."
        )
    return "Better than the recommended one beyond noise: " + "; ".join(found) + "."


def plot(all_results, records: list[Pooled], workload: Workload, out: Path, title):
    """`delta_accuracy.png` for every evaluation, and `curves.png` for `workload`."""
    rows = []
    for record in records:
        config = Config(record.evaluation.approach, record.evaluation.momentum)
        per_workload = {
            name: (
                record.per_workload[name],
                grad_norm_ratio(results[config], results[BASELINE]),
            )
            for name, results in all_results.items()
        }
        rows.append(
            plots.Row(
                label(*record.evaluation), record.difference, record.ratio, per_workload
            )
        )
    plots.delta_accuracy(rows, out, title)
    results = all_results[workload.name]
    curves = {
        momentum: [
            (
                "no norm" if config == NO_NORM else config.approach,
                np.median(results[config]["grad_norm"], axis=0),
            )
            for config in [NO_NORM] + [Config(a, momentum) for a in APPROACHES]
        ]
        for momentum in MOMENTA
    }
    plots.gradient_curves(curves, f"{workload.name}: {workload.description}", out)


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
    # The guide's figures sit beside this file, so it names upstream's version (the
    # local label is this repository's own).
    upstream_version = eqx.__version__.partition("+")[0]
    header = (
        f"jax {jax.__version__}, equinox {upstream_version} with "
        f"`BatchNorm(approach=...)`; {title}. Every "
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
    reference = [w for w in workloads if w.reference_without_norm]
    if reference:
        plot(suite.results, records, reference[0], args.out, title)
    print()
    print(table)
    print()
    print(recommendation)
    print(f"\nWrote {args.out}/summary.txt, workloads.txt, results.json and the plots.")


if __name__ == "__main__":
    sys.exit(main())
