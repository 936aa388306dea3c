"""The package reads as layers: every import points down (or within its own subpackage), the
library never imports the entry points, the config module is JAX-free, scripts stay thin, and
`ruff check` passes."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "distrifusion_jax"

# Bottom to top. A module may import its own subpackage and anything on a lower layer only.
LAYERS = [
    ["platform"],
    ["parallel", "compile_cache"],
    ["models", "sampling"],
    ["io", "prompt"],
    ["refiner", "control"],  # the SDXL refiner expert; ControlNets with their images
    ["pipeline"],
    ["eval"],
    ["aot", "tiny"],
    ["cli"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_SCRIPT_LINES = 300


def _unit(module: str) -> str | None:
    """`distrifusion_jax.parallel.step` -> `parallel` (None outside the package)."""
    parts = module.split(".")
    if parts[0] != "distrifusion_jax":
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    """Every absolute module a file imports (also inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
            # `from distrifusion_jax import io` names a subpackage
            if node.module == "distrifusion_jax":
                out += [f"distrifusion_jax.{a.name}" for a in node.names if a.name in RANK]
    return out


def _library_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "assets" not in p.parts)


def test_every_unit_has_a_layer():
    units = {p.relative_to(PKG).parts[0].removesuffix(".py") for p in _library_files()}
    assert units - {"__init__"} <= set(RANK), sorted(units - {"__init__"} - set(RANK))


def test_imports_point_down():
    upward = []
    for path in _library_files():
        unit = _unit("distrifusion_jax." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        if unit in ("", "__init__"):
            continue  # the package root re-exports lazily
        for target in _imports(path):
            if target.split(".")[0] in ("convert", "scripts", "tests"):
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
            other = _unit(target)
            if other in (None, "", unit):
                continue
            if RANK[other] >= RANK[unit]:
                upward.append(f"{path.relative_to(ROOT)} ({unit}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_config_imports_no_jax():
    code = (
        "import sys; import distrifusion_jax.parallel.config as c; "
        "from distrifusion_jax.parallel import MODES, ParallelConfig; "
        "assert 'jax' not in sys.modules, 'jax imported'; print(len(c.MODES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr


def test_scripts_are_thin():
    long = {
        p.name: n
        for p in (ROOT / "scripts").glob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_SCRIPT_LINES
    }
    assert not long, long


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -c constraints.txt -e '.[test]'")
    out = subprocess.run([ruff, "check", "."], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-4000:]
