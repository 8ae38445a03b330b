"""The package layers of the README ("Layers"): no module imports from a layer above its own.

Every import of every module under sharded_mde/ (top-level and inside functions, read with ast) is
checked against `LAYERS`. Today's known violations are listed in `ALLOWED` with their reason; a new
violation fails, and so does an allowed one that no longer occurs (delete it from the list).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "sharded_mde"

# bottom (0) to top; a module may import from its own layer and the ones below
LAYERS: Dict[str, int] = {
    "io": 0, "interrupts": 0, "config": 0, "plots": 0,  # shared utilities: files, signals, config dataclasses, figures
    "dims": 0,  # the shared vocabulary of every stage: legal dims, byte model, dims file
    "data": 1,  # data sets, vocabularies, batches
    "plan": 2,  # table plans, sharding plans, memory report
    "modules": 3,  # the nn.Modules: masked EBC, token groups, heads, the training wrapper
    "train": 4,  # DMP + pipeline trainer, checkpoints, metrics
    "export": 5,  # compact export and serving
    "search": 6,  # the dimension searches (HAM, PME, baselines) and retraining
    "pipeline": 7,  # the whole run: data -> search -> retrain -> plan -> export
    "bench": 8,  # benchmarks over whole runs
    "cli": 9, "__init__": 9,  # the command line and the public API facade
}

# (importing module, imported module) -> why it is allowed for now
ALLOWED: Dict[Tuple[str, str], str] = {
    ("sharded_mde.data.cli", "sharded_mde.train.distributed"):
        "data prepare under torchrun joins the process group the way training does (the process-group set-up belongs below data)",
    ("sharded_mde.data.group", "sharded_mde.train.distributed"):
        "prepare's rank group uses training's process-group timeout (the same move would fix it)",
    ("sharded_mde.data.synth", "sharded_mde.train.metrics"):
        "the planted data's oracle AUC uses the trainer's metric (the metric belongs below data)",
    ("sharded_mde.export.stage", "sharded_mde.bench"):
        "the export stage records the machine it ran on (machine_info belongs in a utility module)",
}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise AssertionError(f"{module}: package {key!r} has no layer in tests/test_layers.py (and the README)")
    return LAYERS[key]


def _imports(path: Path, package: Path) -> Iterator[str]:
    """Every sharded_mde module `path` imports (absolute and relative imports)."""
    here = _module_name(path, package)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "sharded_mde")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "sharded_mde":
                yield node.module


def upward_imports(package: Path = PACKAGE) -> Set[Tuple[str, str]]:
    """(importer, imported) for every import from a higher layer in the package at `package`."""
    found = set()
    for path in sorted(package.rglob("*.py")):
        importer = _module_name(path, package)
        for imported in _imports(path, package):
            if imported != "sharded_mde" and _layer(imported) > _layer(importer):
                found.add((importer, imported))
    return found


def test_no_module_imports_from_a_higher_layer() -> None:
    found = upward_imports()
    new = sorted(found - set(ALLOWED))
    assert not new, "imports from a higher layer (see README 'Layers'): " + "; ".join(f"{a} -> {b}" for a, b in new)
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"allowed violations that no longer occur (remove them from ALLOWED): {stale}"


def test_only_the_command_line_imports_cli_modules() -> None:
    """Library code lives outside `cli.py`: a `*.cli` module is imported only by `sharded_mde.cli`, and other
    `cli.py` modules import only the shared argparse helpers of `train.cli`."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path, PACKAGE)
        for imported in _imports(path, PACKAGE):
            if imported.endswith(".cli") and imported != importer and importer != "sharded_mde.cli":
                if not (importer.endswith(".cli") and imported == "sharded_mde.train.cli"):
                    found.append(f"{importer} -> {imported}")
    assert not found, "library code imports a cli module: " + "; ".join(found)


def test_the_check_sees_upward_imports_also_inside_functions_and_relative(tmp_path: Path) -> None:
    pkg = tmp_path / "sharded_mde"
    (pkg / "plan").mkdir(parents=True)
    (pkg / "plan" / "dims.py").write_text("import os\nfrom sharded_mde.io import read_json\n"
                                          "def f():\n    from sharded_mde.search.budget import select_dims\n")
    (pkg / "plan" / "tables.py").write_text("from ..train import trainer\nfrom . import dims\n")
    assert upward_imports(pkg) == {("sharded_mde.plan.dims", "sharded_mde.search.budget"),
                                   ("sharded_mde.plan.tables", "sharded_mde.train")}
