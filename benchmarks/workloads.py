"""The models and workloads that `suite.py` and `speed.py` share.

A model is an Equinox module built as `Model(norm, image_size, key)`, where
`norm(channels)` returns the normalisation layer to put in place (a BatchNorm, the
hand-written floor, or none); it is called on one example, `model(x, state) ->
(logits, state)`, under `jax.vmap(..., axis_name=AXIS)`.

To add a workload to the suite, append one `Workload` to `WORKLOADS` (append: a
workload's position seeds its batches, so the others keep theirs). To add a layer shape
to the speed benchmark, add one entry to `LAYER_SHAPES`.
"""

import dataclasses
import gzip
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


AXIS = "batch"  # the vmapped batch axis every model is called under


# ----------------------------------------------------------------- normalisation


class NoNorm(eqx.Module):
    def __call__(self, x, state):
        return x, state


class FloorNorm(eqx.Module):
    """The floor as an Equinox layer: minimal batch normalisation and a plain EMA of the
    batch statistics, as any BatchNorm keeps for inference. Two-pass (the default): the
    mean, then the mean squared deviation, two reads of x and two all-reduces, as stock
    Equinox. One-pass: E[x] and E[x^2] in one read and one all-reduce (not exact when
    |mean| >> std)."""

    weight: jax.Array
    bias: jax.Array
    running: eqx.nn.StateIndex
    momentum: float = eqx.field(static=True)
    one_pass: bool = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels, momentum=0.9, one_pass=False, eps=1e-5):
        self.weight = jnp.ones(channels)
        self.bias = jnp.zeros(channels)
        self.running = eqx.nn.StateIndex((jnp.zeros(channels), jnp.ones(channels)))
        self.momentum, self.one_pass, self.eps = momentum, one_pass, eps

    def __call__(self, x, state):
        axes = tuple(range(1, x.ndim))
        channel = (-1,) + (1,) * (x.ndim - 1)
        if self.one_pass:
            sums = jnp.concatenate([jnp.mean(x, axis=axes), jnp.mean(x * x, axis=axes)])
            mean, square = jnp.split(jax.lax.pmean(sums, AXIS), 2)
            var = jnp.maximum(square - mean * mean, 0)
            scale = self.weight * jax.lax.rsqrt(var + self.eps)
            shift = self.bias - mean * scale
            out = x * scale.reshape(channel) + shift.reshape(channel)
        else:
            mean = jax.lax.pmean(jnp.mean(x, axis=axes), AXIS)
            centred = x - mean.reshape(channel)
            var = jax.lax.pmean(jnp.mean(centred * centred, axis=axes), AXIS)
            scale = self.weight * jax.lax.rsqrt(var + self.eps)
            out = centred * scale.reshape(channel) + self.bias.reshape(channel)
        running_mean, running_var = state.get(self.running)
        m = self.momentum
        state = state.set(
            self.running,
            (m * running_mean + (1 - m) * mean, m * running_var + (1 - m) * var),
        )
        return out, state


def has_approach() -> bool:
    """Whether `eqx.nn.BatchNorm` takes `approach=` (stock 0.13.8 has only `mode=`)."""
    return "approach" in inspect.signature(eqx.nn.BatchNorm.__init__).parameters


def norm_factory(kind: str, momentum: float | None = None) -> Callable[[int], Any]:
    """`norm(channels)` for a model: `kind` is "none", "floor" (two-pass), "floor
    (one-pass)", or an approach of `eqx.nn.BatchNorm` (passed as `mode=` on stock
    equinox)."""
    if kind == "none":
        return lambda channels: NoNorm()
    if kind in ("floor", "floor (two-pass)", "floor (one-pass)"):
        one_pass = kind == "floor (one-pass)"
        return lambda channels: FloorNorm(channels, momentum or 0.9, one_pass)
    kwargs: dict[str, Any] = {"approach": kind} if has_approach() else {"mode": kind}
    return lambda channels: eqx.nn.BatchNorm(
        channels, AXIS, momentum=momentum, **kwargs
    )


# ------------------------------------------------------------------------ models


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
    identity), global average pooling and a linear classifier: five norm layers."""

    stem: eqx.nn.Conv2d
    stem_norm: Any
    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[Any, ...]
    head: eqx.nn.Linear

    def __init__(self, norm, image_size, key, in_channels=1, width=8, use_bias=True):
        keys = jax.random.split(key, 6)
        self.stem = eqx.nn.Conv2d(
            in_channels, width, 3, padding=1, use_bias=use_bias, key=keys[0]
        )
        self.stem_norm = norm(width)
        self.convs = tuple(
            eqx.nn.Conv2d(width, width, 3, padding=1, use_bias=use_bias, key=k)
            for k in keys[1:5]
        )
        self.norms = tuple(norm(width) for _ in range(4))
        self.head = eqx.nn.Linear(width, 10, key=keys[5])

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


# ------------------------------------------------------------- suite workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    model: Callable[..., eqx.Module]
    batch_size: int
    optimiser: Callable[[], optax.GradientTransformation]
    steps: int
    classes_per_batch: int | None = None  # None: i.i.d. batches
    # False: always on the bundled digits, even when `--mnist` is given.
    on_mnist: bool = True
    # Also train the network without normalisation, for reference; its gradient-norm
    # curves are plotted (`curves.png`).
    reference_without_norm: bool = False


WORKLOADS = (
    Workload(
        "cnn659",
        "#659's CNN, Adam(3e-3), batch 64",
        CNN659,
        64,
        lambda: optax.adam(3e-3),
        300,
        reference_without_norm=True,
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
        on_mnist=False,
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


# --------------------------------------------------------------- suite data


def load_digits():
    """scikit-learn's bundled 8x8 digits (no download), split 80/20."""
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
    """MNIST's 10k test split from its idx files, split 8000 train / 2000 held out."""
    images = read_idx(directory / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255
    labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz").astype(np.int32)
    return split(images[:, None], labels, 0.8)


def split(images, labels, fraction):
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    cut = int(fraction * len(images))
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def batch_indices(rng, labels, workload: Workload, count):
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


# --------------------------------------------------------------- speed workloads

# One layer's training step and inference: (N, C) or (N, C, H, W) float32 inputs.
LAYER_SHAPES = {
    "conv (128, 64, 16, 16)": (128, 64, 16, 16),
    "dense (256, 512)": (256, 512),
}
QUICK_LAYER_SHAPES = {"conv (8, 4, 4, 4)": (8, 4, 4, 4), "dense (8, 16)": (8, 16)}


@dataclasses.dataclass(frozen=True)
class ResNetStep:
    """A jitted SGD step of `ResNet` on random (batch, 3, image, image) inputs."""

    width: int = 16
    batch: int = 64
    image: int = 32

    def model(self, norm, key):
        return ResNet(
            norm, self.image, key, in_channels=3, width=self.width, use_bias=False
        )


RESNET_STEP = ResNetStep()
QUICK_RESNET_STEP = ResNetStep(width=4, batch=4, image=8)
