"""Reproduces equinox issue #659 for every `eqx.nn.BatchNorm(approach=...)`.

The introductory CNN of the issue, Conv2d(1, 3, 4) -> MaxPool2d(2) -> relu -> ravel ->
Linear(., 512) -> BatchNorm(512) -> relu -> Linear(512, 64) -> relu -> Linear(64, 10)
-> log_softmax, trained with Adam(3e-3) at batch size 64: once without BatchNorm, and
with every approach at several momenta, over several seeds. The same seed gives the
same initialisation and the same batch order for every configuration.

By default it runs on scikit-learn's bundled 8x8 digits (no download); `--mnist DIR`
runs on MNIST's idx files (the 10k test split is enough: 8000 train / 2000 held out).
It prints a markdown table (mean ± std over seeds), writes it to `--out`, and draws
the plots there.

    python benchmarks/bn659.py                       # digits, a few minutes on 2 CPUs
    python benchmarks/bn659.py --mnist ../shared/data/mnist --seeds 8 --steps 300
"""

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


DESCRIPTION = "Reproduces equinox issue #659 for every BatchNorm approach."
APPROACHES = ("batch", "batch_renorm", "ema", "ema_debiased", "ema_smooth_start")
NO_NORM = "none"
BATCH_SIZE = 64
LEARNING_RATE = 3e-3


class CNN(eqx.Module):
    conv: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    linear1: eqx.nn.Linear
    norm: eqx.nn.BatchNorm | None
    linear2: eqx.nn.Linear
    linear3: eqx.nn.Linear

    def __init__(self, image_size: int, approach: str, momentum: float, options, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2)
        features = 3 * (image_size - 4) ** 2
        self.linear1 = eqx.nn.Linear(features, 512, key=k2)
        self.norm = (
            None
            if approach == NO_NORM
            else eqx.nn.BatchNorm(
                512, "batch", momentum=momentum, approach=approach, **options
            )
        )
        self.linear2 = eqx.nn.Linear(512, 64, key=k3)
        self.linear3 = eqx.nn.Linear(64, 10, key=k4)

    def __call__(self, x, state):
        x = jax.nn.relu(self.pool(self.conv(x)))
        x = self.linear1(jnp.ravel(x))
        if self.norm is not None:
            x, state = self.norm(x, state)
        x = jax.nn.relu(x)
        x = jax.nn.relu(self.linear2(x))
        return jax.nn.log_softmax(self.linear3(x)), state


def batched(model):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def nll(log_probs, labels):
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(log_probs, labels):
    return jnp.mean(jnp.argmax(log_probs, axis=1) == labels)


def make_run(data, image_size, approach, momentum, steps, options):
    """A jitted function from (key, batch order) to one seed's training curves and
    final metrics; vmapped over seeds."""
    x_train, y_train, x_test, y_test = data
    optimiser = optax.adam(LEARNING_RATE)
    test_batches = len(x_test) // BATCH_SIZE

    def loss_fn(model, state, x, y):
        log_probs, state = batched(model)(x, state)
        return nll(log_probs, y), state

    def run(key, order):
        model, state = eqx.nn.make_with_state(CNN)(
            image_size, approach, momentum, options, key
        )
        params, static = eqx.partition(model, eqx.is_inexact_array)
        opt_state = optimiser.init(params)

        def step(carry, index):
            params, state, opt_state = carry
            model = eqx.combine(params, static)
            grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
            (loss, state), grads = grad_fn(model, state, x_train[index], y_train[index])
            grads = eqx.filter(grads, eqx.is_inexact_array)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            params = eqx.apply_updates(params, updates)
            return (params, state, opt_state), (loss, optax.global_norm(grads))

        (params, state, _), (losses, grad_norms) = jax.lax.scan(
            step, (params, state, opt_state), order
        )
        model = eqx.combine(params, static)
        inference = eqx.nn.inference_mode(model)
        test_log_probs, _ = batched(inference)(x_test, state)
        # Training mode on held-out batches: each batch's own statistics.
        shape = (test_batches, BATCH_SIZE)
        xs = x_test[: test_batches * BATCH_SIZE].reshape(shape + x_test.shape[1:])
        ys = y_test[: test_batches * BATCH_SIZE].reshape(shape)
        train_log_probs, _ = jax.vmap(batched(model), in_axes=(0, None))(xs, state)
        # Train-mode vs inference-mode loss on one fixed training batch.
        fixed_x, fixed_y = x_train[:BATCH_SIZE], y_train[:BATCH_SIZE]
        train_mode, _ = batched(model)(fixed_x, state)
        infer_mode, _ = batched(inference)(fixed_x, state)
        return {
            "loss": losses,
            "grad_norm": grad_norms,
            "test_accuracy": accuracy(test_log_probs, y_test),
            "test_loss": nll(test_log_probs, y_test),
            "test_accuracy_train_mode": jnp.mean(
                jax.vmap(accuracy)(train_log_probs, ys)
            ),
            "gap": nll(train_mode, fixed_y) - nll(infer_mode, fixed_y),
        }

    return jax.jit(jax.vmap(run))


def load_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    digits: Any = sklearn_digits()
    images = (np.asarray(digits.images) / 16.0).astype(np.float32)
    labels = np.asarray(digits.target).astype(np.int32)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(images))
    return images, labels, split


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
    return images, labels, 8000


def summarise(values) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.4g} ± {values.std():.2g}"


def table(results, configs) -> str:
    header = (
        "| approach | momentum | max grad norm | step of max | median grad norm "
        "| train loss 0-99 | train loss last 50 | held-out acc (inference) "
        "| held-out loss (inference) | held-out acc (train mode) "
        "| train−inference loss gap |"
    )
    lines = [header, "|" + "---|" * 11]
    for approach, momentum in configs:
        r = results[(approach, momentum)]
        grad = r["grad_norm"]
        lines.append(
            "| "
            + " | ".join(
                [
                    approach,
                    "–" if approach == NO_NORM else str(momentum),
                    summarise(grad.max(axis=1)),
                    summarise(grad.argmax(axis=1)),
                    summarise(np.median(grad, axis=1)),
                    summarise(r["loss"][:, :100].mean(axis=1)),
                    summarise(r["loss"][:, -50:].mean(axis=1)),
                    summarise(100 * r["test_accuracy"]) + " %",
                    summarise(r["test_loss"]),
                    summarise(100 * r["test_accuracy_train_mode"]) + " %",
                    summarise(r["gap"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def targets(results, approaches, momenta) -> str:
    """The targets of the guide for each approach against "batch", paired by seed."""
    lines = [
        "| approach | momentum | max grad norm / batch's | Δ held-out acc vs batch "
        "| mean abs(gap) | meets targets |",
        "|---|---|---|---|---|---|",
    ]
    for approach in approaches:
        for momentum in momenta:
            r, b = results[(approach, momentum)], results[("batch", momentum)]
            ratio = np.mean(r["grad_norm"].max(axis=1) / b["grad_norm"].max(axis=1))
            delta = 100 * np.mean(r["test_accuracy"] - b["test_accuracy"])
            gap = np.mean(np.abs(r["gap"]))
            needed = 1.5 if momentum >= 0.999 else 0.0
            ok = ratio <= 1.2 and delta >= needed and gap <= 0.005
            if approach == "batch":
                ok = gap <= 0.005
            lines.append(
                f"| {approach} | {momentum} | {ratio:.2f} | {delta:+.2f} pp "
                f"| {gap:.4f} | {'yes' if ok else 'no'} |"
            )
    return "\n".join(lines)


def plot(results, momenta, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    colours = dict(zip((NO_NORM,) + APPROACHES, palette))
    fig, axes = plt.subplots(
        2, len(momenta), figsize=(5 * len(momenta), 8), sharex=True
    )
    axes = np.asarray(axes).reshape(2, len(momenta))
    for column, momentum in enumerate(momenta):
        for approach in (NO_NORM,) + APPROACHES:
            r = results[(approach, NO_NORM if approach == NO_NORM else momentum)]
            steps = np.arange(r["loss"].shape[1])
            for row, key in enumerate(("grad_norm", "loss")):
                axes[row, column].plot(
                    steps,
                    np.median(r[key], axis=0),
                    label=approach,
                    color=colours[approach],
                    linewidth=1.2,
                )
        axes[0, column].set_title(f"momentum {momentum}")
        axes[0, column].set_yscale("log")
        axes[1, column].set_yscale("log")
        axes[1, column].set_xlabel("step")
    axes[0, 0].set_ylabel("global gradient norm (median over seeds)")
    axes[1, 0].set_ylabel("train loss (median over seeds)")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for approach in APPROACHES:
        accs = [100 * results[(approach, m)]["test_accuracy"] for m in momenta]
        ax.errorbar(
            [str(m) for m in momenta],
            [a.mean() for a in accs],
            yerr=[a.std() for a in accs],
            label=approach,
            color=colours[approach],
            marker="o",
            capsize=3,
        )
    baseline = 100 * results[(NO_NORM, NO_NORM)]["test_accuracy"]
    ax.axhline(baseline.mean(), color=colours[NO_NORM], linestyle="--", label="no norm")
    ax.set_xlabel("momentum")
    ax.set_ylabel("held-out accuracy, inference mode (%)")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--mnist", type=Path, help="folder with MNIST idx .gz files")
    parser.add_argument(
        "--steps", type=int, default=None, help="default 300 (MNIST), 200 (digits)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES
    )
    parser.add_argument("--momenta", nargs="+", type=float, default=[0.9, 0.99, 0.999])
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="BatchNorm(warmup=...) for the approaches that take it",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args(argv)

    if args.mnist is not None:
        images, labels, split = load_mnist(args.mnist)
        name, steps = "MNIST (10k split: 8000 train / 2000 held out)", args.steps or 300
    else:
        images, labels, split = load_digits()
        name, steps = (
            "scikit-learn digits (1437 train / 360 held out)",
            args.steps or 200,
        )
    image_size = images.shape[1]
    x = jnp.asarray(images[:, None])
    y = jnp.asarray(labels)
    data = (x[:split], y[:split], x[split:], y[split:])
    keys = jax.random.split(jax.random.PRNGKey(0), args.seeds)
    orders = np.stack(
        [
            np.random.default_rng(seed).integers(0, split, (steps, BATCH_SIZE))
            for seed in range(args.seeds)
        ]
    )
    approaches = [a for a in APPROACHES if a in args.approaches]
    if "batch" not in approaches:
        approaches.insert(0, "batch")
    configs = [(NO_NORM, NO_NORM)] + [(a, m) for m in args.momenta for a in approaches]
    print(
        f"{name}: {steps} steps, batch {BATCH_SIZE}, Adam({LEARNING_RATE}), "
        f"{args.seeds} seeds, {len(configs)} configurations",
        flush=True,
    )
    results = {}
    start = time.perf_counter()
    for i, (approach, momentum) in enumerate(configs, 1):
        takes_warmup = approach in ("batch_renorm", "ema_smooth_start")
        options = {"warmup": args.warmup} if takes_warmup and args.warmup else {}
        momentum_value = 0.99 if momentum == NO_NORM else momentum
        run = make_run(data, image_size, approach, momentum_value, steps, options)
        out = jax.tree_util.tree_map(np.asarray, run(keys, jnp.asarray(orders)))
        results[(approach, momentum)] = out
        print(
            f"[{i}/{len(configs)}] {approach:>16} momentum={momentum}: held-out acc "
            f"{100 * out['test_accuracy'].mean():.2f}%, max grad norm "
            f"{out['grad_norm'].max(axis=1).mean():.3g} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    text = [
        f"# BatchNorm approaches on {name}",
        "",
        f"{steps} steps, batch {BATCH_SIZE}, Adam({LEARNING_RATE}), mean ± std over "
        f"{args.seeds} seeds (same initialisation and batch order per seed). "
        f"jax {jax.__version__}, equinox {eqx.__version__}.",
        "",
        table(results, configs),
        "",
        "## Targets (paired by seed against `batch`)",
        "",
        "Max gradient norm ≤ 1.2× `batch`'s, held-out inference accuracy ≥ `batch`'s "
        "(+1.5 pp at momentum 0.999), |train − inference loss gap| ≤ 0.005 nats.",
        "",
        targets(results, approaches, args.momenta),
    ]
    report = "\n".join(text) + "\n"
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(report)
    raw = {
        f"{a}@{m}": {
            k: np.round(np.asarray(v, np.float64), 5).tolist() for k, v in r.items()
        }
        for (a, m), r in results.items()
    }
    (args.out / "results.json").write_text(json.dumps(raw))
    plot(results, args.momenta, args.out, name)
    print(f"Wrote {args.out}/results.md, results.json, curves.png, accuracy.png")


if __name__ == "__main__":
    sys.exit(main())
