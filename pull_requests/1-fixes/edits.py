"""The first pull request's change to upstream's `equinox/nn/_batch_norm.py`: bug
fixes within `mode=`, with no new argument and no new public name.

`scripts/export-to-upstream --stack` applies these edits to the file in an upstream
checkout of v0.13.8. Each one replaces a passage of 0.13.8's text that must occur in
the file exactly once, so the export fails loudly, naming the edit, if upstream's file
is not the one these were written against.

- #955: `mode="ema"` starts its running statistics at mean 0 and variance 1, not at
  `jnp.empty`, so inference before training returns the input, not `x / sqrt(eps)`.
- `mode="batch"` debiases exactly. Its hidden statistics after k steps are
  `m**k * (0, 1) + (1 - m**k) * average`; 0.13.8 divided them by `1 - m**k`, which
  adds `m**k / (1 - m**k)` to the variance. The average it accumulates is of the
  unbiased batch variance, as the docstring already promised.
- Statistics in at least float32, the output in a floating input's dtype, the running
  statistics stored in `dtype` as before (so checkpoints load).
- A `ValueError` naming `input_size` for an input with another number of channels.
- No division by zero anywhere, not even in a branch that `jnp.where` discards
  (`jax_debug_nans`).
"""

PATH = "equinox/nn/_batch_norm.py"

EDITS: tuple[tuple[str, str, str], ...] = (
    (
        "mode='batch' is debiased exactly, with the unbiased variance",
        """\
    learning packages (e.g. PyTorch, flax, haiku) implement batch norm.
""",
        """\
    learning packages (e.g. PyTorch, flax, haiku) implement batch norm. The running
    averages are debiased as in Adam: after $k$ training steps with batch statistics
    $s_1, \\ldots, s_k$, inference uses
    $\\frac{1 - m}{1 - m^k} \\sum_{j=1}^k m^{k - j} s_j$, where $m$ is `momentum`. The
    unbiased variance is the batch variance times $\\frac{n}{n - 1}$, where $n$ counts
    the values reduced per channel: over the spatial dimensions and every named axis.
""",
    ),
    (
        "inference before training (#955)",
        """\
    they are populated.  During inference the running statistics are used for
    normalization.
""",
        """\
    they are populated.  During inference the running statistics are used for
    normalization.

    In both modes, inference before any training step normalises with a mean of 0
    and a variance of 1.
""",
    ),
    (
        "the dtype of the statistics",
        """\
            `jax.numpy.float32` or `jax.numpy.float64` depending on whether JAX is in
            64-bit mode.
""",
        """\
            `jax.numpy.float32` or `jax.numpy.float64` depending on whether JAX is in
            64-bit mode. The statistics themselves are computed in at least `float32`
            (in the input's dtype if that is wider), whatever this dtype.
""",
    ),
    (
        "mode='ema' starts at mean 0, variance 1 (#955)",
        """\
            init_buffers = (
                jnp.empty((input_size,), dtype=dtype),
                jnp.empty((input_size,), dtype=dtype),
            )
""",
        """\
            init_buffers = (
                jnp.zeros((input_size,), dtype=dtype),
                jnp.ones((input_size,), dtype=dtype),
            )
""",
    ),
    (
        "the output's dtype",
        """\
        - A JAX array of shape `(input_size, dim_1, ..., dim_N)`.
""",
        """\
        - A JAX array of shape `(input_size, dim_1, ..., dim_N)`, with the dtype of `x`
            if `x` is floating-point.
""",
    ),
    (
        "the input-shape error, documented",
        """\
        does not have a matching `axis_name`.
        \"\"\"
""",
        """\
        does not have a matching `axis_name`.

        A `ValueError` if `x.shape[0]` is not `input_size`.
        \"\"\"
""",
    ),
    (
        "the input-shape error; statistics in at least float32",
        """\
        if inference is None:
            inference = self.inference

""",
        """\
        if inference is None:
            inference = self.inference
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"`BatchNorm(input_size={self.input_size}, ...)` takes inputs of shape "
                f"`(input_size, dim_1, ..., dim_N)`, but got one of shape {x.shape}."
            )
        orig_dtype = x.dtype
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x.dtype, jnp.float32)
        x = x.astype(dtype)

""",
    ),
    (
        "normalise in the statistics' dtype; store running statistics in theirs",
        """\
            out = (y - m) / jnp.sqrt(v + self.eps)
            if self.channelwise_affine:
                out = out * w + b
            return out
""",
        """\
            out = (y - m.astype(dtype)) / jnp.sqrt(v.astype(dtype) + self.eps)
            if self.channelwise_affine:
                out = out * w.astype(dtype) + b.astype(dtype)
            return out

        def _store(new, old):  # Running statistics keep their dtype.
            return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)
""",
    ),
    (
        "mode='ema': combine in the statistics' dtype",
        """\
                running_mean, running_var = state.get(self.ema_state_index)
""",
        """\
                running = state.get(self.ema_state_index)
                running_mean, running_var = (r.astype(dtype) for r in running)
""",
    ),
    (
        "mode='ema': store in `dtype`",
        """\
                state = state.set(self.ema_state_index, (mean, var))
""",
        """\
                state = state.set(self.ema_state_index, _store((mean, var), running))
""",
    ),
    (
        "mode='batch': read in the statistics' dtype",
        """\
            hidden_mean, hidden_var = state.get(self.batch_state_index)
""",
        """\
            hidden = state.get(self.batch_state_index)
            hidden_mean, hidden_var = (h.astype(dtype) for h in hidden)
""",
    ),
    (
        "mode='batch': exact debiasing, no 0/0 before the first step",
        """\
                # Zero-debias approach: mean = hidden_mean / (1 - momentum^counter)
                # For simplicity we do the minimal version here (no warmup).
                scale = jnp.where(counter == 0, 1, 1 - self.momentum**counter)
                mean = hidden_mean / scale
                var = hidden_var / scale
""",
        """\
                # After k >= 1 steps the hidden statistics are
                # m^k * (0, 1) + (1 - m^k) * (the debiased averages), and before the
                # first step they are (0, 1). Nothing divides by zero, not even in a
                # branch that is discarded (for `jax_debug_nans`).
                decay = jnp.where(counter == 0, 0, self.momentum**counter).astype(dtype)
                mean = hidden_mean / (1 - decay)
                var = (hidden_var - decay) / (1 - decay)
""",
    ),
    (
        "mode='batch': accumulate the unbiased variance, store in `dtype`",
        """\
                mean, var = jax.vmap(_stats)(x)
                new_counter = counter + 1
""",
        """\
                mean, var = jax.vmap(_stats)(x)
                # The running variance is the unbiased one: `n` counts the values
                # reduced per channel, over the spatial dimensions and all named axes.
                n = lax.psum(1, self.axis_name) * x[0].size
                unbiased_var = var * (n / max(n - 1, 1))
                new_counter = counter + 1
""",
    ),
    (
        "mode='batch': the unbiased variance, stored in `dtype`",
        """\
                new_hidden_var = hidden_var * self.momentum + var * (1 - self.momentum)
                state = state.set(self.batch_counter, new_counter)
                state = state.set(
                    self.batch_state_index, (new_hidden_mean, new_hidden_var)
                )
""",
        """\
                new_hidden_var = hidden_var * self.momentum + unbiased_var * (
                    1 - self.momentum
                )
                new_hidden = _store((new_hidden_mean, new_hidden_var), hidden)
                state = state.set(self.batch_counter, new_counter)
                state = state.set(self.batch_state_index, new_hidden)
""",
    ),
    (
        "the output in a floating input's dtype",
        """\
        out = jax.vmap(_norm)(x, mean, var, self.weight, self.bias)
        return out, state
""",
        """\
        out = jax.vmap(_norm)(x, mean, var, self.weight, self.bias)
        if jnp.issubdtype(orig_dtype, jnp.inexact):
            out = out.astype(orig_dtype)
        return out, state
""",
    ),
)


def apply(text: str) -> str:
    """Applies every edit to 0.13.8's `_batch_norm.py`; fails loudly, naming the edit,
    if a passage it replaces is not in `text` exactly once."""
    for name, old, new in EDITS:
        found = text.count(old)
        if found != 1:
            raise SystemExit(
                f"{PATH}: the edit {name!r} expects its passage once, found it "
                f"{found} times. Is this upstream's v0.13.8?"
            )
        text = text.replace(old, new)
    return text
