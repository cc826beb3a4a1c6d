"""Padded batches on 8 devices: the statistics of eqx.nn.BatchNorm(mask=...) and of
Flax's BatchNorm(mask=...), each under `jax.shard_map`, against float64 NumPy over the
valid values alone. Prints a Markdown table.

    python benchmarks/masked_peers.py

Two paddings: device d holds d valid examples of 8 (the first only padding), and
device d holds d + 1 (every device some real data).
"""

import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import equinox as eqx
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


DEVICES, PER_DEVICE, CHANNELS = 8, 8, 4


def main() -> None:
    print(
        "| valid examples per device | layer | error of the mean (in std) | "
        "relative error of the variance |"
    )
    print("|---|---|---|---|")
    for first in (0, 1):
        compare(first)


def compare(first: int) -> None:
    rng = np.random.default_rng(0)
    valid = np.zeros((DEVICES, PER_DEVICE), bool)
    for device in range(DEVICES):
        valid[device, : device + first] = True
    valid = valid.reshape(-1)
    counts = f"{first}, {first + 1}, ..., {first + DEVICES - 1}"
    x = rng.normal(2.0, 3.0, (DEVICES * PER_DEVICE, CHANNELS)).astype(np.float32)
    x = x + rng.normal(0.0, 2.0, (DEVICES * PER_DEVICE, 1)).astype(np.float32)
    real = x[valid].astype(np.float64)
    mean, var = real.mean(axis=0), real.var(axis=0)
    mesh = Mesh(jax.devices()[:DEVICES], ("devices",))

    def shard(f):
        return jax.jit(
            jax.shard_map(
                f,
                mesh=mesh,
                in_specs=(P("devices"), P("devices"), P()),
                out_specs=P("devices"),
                check_vma=False,
            )
        )

    layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        CHANNELS, ("devices", "batch"), approach="batch", channelwise_affine=False
    )

    def equinox_out(x, valid, state):
        call = lambda x, mask: layer(x, state, mask=mask)
        out, _ = jax.vmap(call, axis_name="batch", out_axes=(0, None))(x, valid)
        return out

    reference = flax_nn.BatchNorm(
        use_running_average=False,
        axis_name="devices",
        use_scale=False,
        use_bias=False,
        use_fast_variance=False,
    )
    variables = reference.init(jax.random.PRNGKey(0), x[:PER_DEVICE])

    def flax_out(x, valid, state):
        del state
        mask = jnp.broadcast_to(valid[:, None], x.shape)
        out, _ = reference.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return out

    # Read each layer's statistics off its output: out = (x - mean) / sqrt(var + eps).
    for name, f in (("equinox, mask=", equinox_out), ("flax linen, mask=", flax_out)):
        out = np.asarray(
            shard(f)(jnp.asarray(x), jnp.asarray(valid), state), np.float64
        )
        a, b = real[0], real[1]
        scale = (a - b) / (out[valid][0] - out[valid][1])  # sqrt(var + eps)
        used_mean = a - out[valid][0] * scale
        used_var = scale**2 - 1e-5
        mean_error = np.max(np.abs(used_mean - mean) / np.sqrt(var))
        var_error = np.max(np.abs(used_var - var) / var)
        print(f"| {counts} | {name} | {mean_error:.1e} | {var_error:.1e} |")


if __name__ == "__main__":
    main()
