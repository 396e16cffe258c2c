"""What a registered model carries so that it loads where msa-sweep is not installed: the source
files of its serving path (MLflow ``code_paths``) and its exact pip requirements.

The files are the project modules its pyfunc class's module imports, transitively, read from
their source (every ``import`` of an ``msa.*`` module, function-level ones included), copied
into a folder laid out as the `msa` package. MLflow copies that folder under the model's
``code/`` and puts ``code/`` on `sys.path` when it loads the model, so the pickled class
(``msa.platform.tracking.pyfunc.CheckpointModel``) is found there.

The requirements are the third-party distributions those modules import at module level, mlflow,
and transformers for a model that holds a text encoder (the encoder path imports it inside the
functions that need it), each pinned to the version installed here. A pin keeps the public
version only: ``torch==2.13.0`` admits the CPU build this machine has and a CUDA build alike.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = "msa"
ALWAYS = ("mlflow",)  # the pyfunc flavor itself
TEXT_ENCODER = ("transformers",)


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(f"{module} has no source file to carry")
    return Path(spec.origin)


def _imports(module: str, tree: ast.Module) -> tuple[set[str], set[str]]:
    """(`msa.*` modules imported anywhere in `tree`, top-level names of other modules imported
    at module level). ``from msa.a import b`` names module ``msa.a.b`` when that is a module."""
    project, third_party = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module.startswith(PACKAGE + "."):
                names += [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                project.add(name)
            elif node in tree.body and name.split(".")[0] not in sys.stdlib_module_names | {"__future__"}:
                third_party.add(name.split(".")[0])
    return project - {module}, third_party


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def serving_closure(root: str) -> tuple[list[str], set[str]]:
    """The `msa.*` modules `root` needs (itself included, sorted) and the top-level names of
    the third-party modules they import at module level."""
    seen, third_party, pending = set(), set(), [root]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        project, others = _imports(module, ast.parse(_source(module).read_text(encoding="utf-8")))
        third_party |= others
        pending.extend(project - seen)
    return sorted(seen), third_party


def stage_code(root: str, into: Path) -> Path:
    """Copy the serving closure of module `root` into ``into/msa/...``; returns that folder."""
    modules, _ = serving_closure(root)
    for module in modules:
        target = into.joinpath(*module.split(".")).with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_source(module), target)
    return into / PACKAGE


def pinned_requirements(root: str, *, text_encoder: bool) -> list[str]:
    """``name==version`` of every distribution the serving closure of `root` imports, mlflow,
    and transformers when `text_encoder`; sorted by name."""
    _, third_party = serving_closure(root)
    distributions = _packages_distributions()
    names = {distributions[name][0] for name in third_party}
    names |= set(ALWAYS) | (set(TEXT_ENCODER) if text_encoder else set())
    return sorted(f"{name}=={metadata.version(name).split('+')[0]}" for name in names)


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    """Import name -> distributions, read once per process (about 2.5 s here: it lists every file
    of every installed distribution), not once per registered model."""
    return metadata.packages_distributions()
