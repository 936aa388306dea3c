"""Test configuration: 8 fake CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# generate.py's compile cache goes to a fresh folder, not the user's ~/.cache (which keeps what
# tests download once, e.g. tests/aot's compiler plugin)
os.environ.setdefault(
    "DISTRIFUSION_TEST_USER_CACHE",
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="distrifusion-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random diffusers SDXL folder with its torch models (`tests/tiny_sdxl.py`)."""
    from tests.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


# Test files (or node ids) that take minutes per test on CI's 2 cores, kept out of its 30
# minutes (`-m long` runs them; pyproject's addopts deselects them). The whole suite took ~45
# min here with them: multi-step pipelines vs diffusers and many compiled parallel programs.
LONG_TESTS: frozenset[str] = frozenset(
    {
        "tests/test_controlnet_parallel.py",
        "tests/test_controlnet_pipeline.py",
        "tests/test_refiner.py",
        "tests/parallel/test_compress_step.py",
        # one more deviceless H200 compile (~1 min): CI keeps the UNet's overlap test
        "tests/aot/test_compiled_overlap.py::test_controlnet_exchange_hidden_too",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("[")[0]
        if node in LONG_TESTS or node.split("::")[0] in LONG_TESTS:
            item.add_marker(pytest.mark.long)
