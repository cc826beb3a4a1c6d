# This repository's test configuration, the counterpart of upstream's own
# `tests/conftest.py` (which the export leaves in place): the same JAX settings, but 8
# CPU devices instead of 2, so that the multi-device tests run on both counts.
import random
import typing

import jax
import jax.random as jr
import pytest


typing.TESTING = True  # pyright: ignore[reportAttributeAccessIssue]

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def getkey():
    return lambda: jr.PRNGKey(random.randint(0, 2**31 - 1))
