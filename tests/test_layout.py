"""The package's shape: the WE core needs torch only, recipes keep their helpers private, scripts stay apart."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("accelerate", "timm", "matplotlib", "sklearn", "yaml", "safetensors", "torchvision", "we_timm.recipes")


def test_public_api_loads_torch_only():
    """A Lightning / HF Trainer / plain-PyTorch user imports the core alone."""
    code = ("import sys\nfrom we_timm import WEConfig, WeightEvolution, selection_rate, WEStats\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from X import name` in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out += [(module, alias.name) for alias in node.names]
    return out


SOURCES = sorted((ROOT / "we_timm").rglob("*.py")) + [ROOT / "train.py", ROOT / "validate.py"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module(path: Path):
    private = [f"{m}.{n}" for m, n in _imports(path) if n.startswith("_") and n != "__future__" and m != "__future__"]
    assert not private, private


@pytest.mark.parametrize("path", sorted((ROOT / "we_timm").glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_the_recipes(path: Path):
    if path.name in ("export.py", "inspect.py"):  # `python -m we_timm.export/inspect`: launchers of recipes, never
        # imported by the core
        return
    assert not [m for m, _ in _imports(path) if "recipes" in m], path


def test_scripts_do_not_import_each_other():
    for script in ("train.py", "validate.py"):
        tree = ast.parse((ROOT / script).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"train", "validate"}, script


def test_every_recipes_module_is_listed():
    """README's Layout and the recipes package's docstring name each module of we_timm/recipes/."""
    import we_timm.recipes

    modules = {p.stem for p in (ROOT / "we_timm" / "recipes").glob("*.py")} - {"__init__"}
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("we_timm/recipes/ ", 1)[1].split("train.py, validate.py ", 1)[0]
    assert modules == set(re.findall(r"^  (\w+)\.py ", layout, re.M))
    assert modules == set(re.findall(r"^    (\w+) ", we_timm.recipes.__doc__, re.M))
