import os
import random


# At least 2 (here 8) CPU devices for the multi-device tests. XLA reads this when JAX
# starts its CPU backend, so it must be set before any test runs JAX code.
_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import jax
import jax.random as jr
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture()
def getkey():
    def _getkey():
        return jr.PRNGKey(random.randint(0, 2**31 - 1))

    return _getkey
