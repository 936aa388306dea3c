"""Test configuration: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random diffusers SDXL folder with its torch models (`tests/tiny_sdxl.py`)."""
    from tests.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
