"""The shape of the tree: the import scheme (top-level folders are `msa` subpackages without
`__init__.py`, so the standard library's `platform` is never shadowed from the repository root),
the one import direction between the layers, every package folder listed for the wheel, the
light commands that must not import torch, and the size limits of the platform's files and
functions. Each checker also gets a case that shows it fails."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]

PACKAGE_FOLDERS = ("platform", "models", "ensembles", "search_spaces")
SOURCE_FOLDERS = ("platform", "models", "ensembles")

# The layers, bottom first. A module may import its own layer and any layer below, never above.
LAYERS = ("core", "models", "data", "training", "tracking", "sweep", "ensembles", "jobs")
# Function-local imports are hoisted, except these deferrals of heavy imports: (file, module) of
# the project, each with its reason in the code, and third-party packages imported on first use.
DEFERRED_PROJECT_IMPORTS = {
    ("platform/cli.py", "msa.platform"),  # jobs pull torch, Ray, DeepSpeed and MLflow: `msa --help` does without
}
# transformers and huggingface_hub: seconds of imports that only runs with a text encoder pay,
# and the Hugging Face environment (offline, quiet) is set just before them.
DEFERRED_PACKAGES = {"ray", "optuna", "mlflow", "matplotlib", "deepspeed", "sklearn", "transformers", "huggingface_hub"}
MAX_PLATFORM_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_REASON = "It is long because"


def layer_of_file(path: Path) -> str:
    """The layer of a source file, from its place in the tree (`path` relative to the root)."""
    parts = path.parts
    if parts[0] == "platform":
        return parts[1] if len(parts) > 2 else "jobs"  # platform/cli.py, jobs.py (and the 0.1.0 shim) on top
    return parts[0]


def layer_of_module(module: str) -> str | None:
    """The layer of an imported `msa.*` module (None for anything else)."""
    parts = module.split(".")
    if parts[0] != "msa" or len(parts) < 2:
        return None
    if parts[1] == "platform":
        return parts[2] if len(parts) > 3 else "jobs"
    return {"models": "models", "ensembles": "ensembles", "search_spaces": "core"}.get(parts[1])


def imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """Every import in `tree`: (module, line, inside a function)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.extend((f"{child.module}.{alias.name}" if child.module == "msa.platform" else child.module,
                              child.lineno, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def layer_violations(path: Path, source: str) -> list[str]:
    """Imports in `source` (the file at `path`, relative to the root) that break the layer rule
    or are function-local without a listed reason."""
    own = layer_of_file(path)
    problems = []
    for module, line, local in imports(ast.parse(source)):
        target = layer_of_module(module)
        if target is not None and LAYERS.index(target) > LAYERS.index(own):
            problems.append(f"{path}:{line}: the {own} layer imports {module} ({target}, above it)")
        if local and target is not None and (str(path), module.rsplit(".", 1)[0]) not in DEFERRED_PROJECT_IMPORTS:
            problems.append(f"{path}:{line}: function-local import of {module}; hoist it to the top")
        if local and target is None and module.split(".")[0] not in DEFERRED_PACKAGES and module.split(".")[0] != "msa":
            problems.append(f"{path}:{line}: function-local import of {module}, which is not a heavy package to defer")
    return problems


def source_files() -> list[Path]:
    return sorted(p.relative_to(REPO_ROOT) for folder in SOURCE_FOLDERS for p in (REPO_ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", PACKAGE_FOLDERS)
def test_no_init_file(folder, repo_root):
    assert not (repo_root / folder / "__init__.py").exists()


@pytest.mark.parametrize(
    "code",
    [
        "import platform; platform.system()",
        "import platform, torch, ray, deepspeed; platform.system()",
        "import msa.platform.cli, msa.models.registry; import platform; platform.machine()",
    ],
)
def test_imports_from_repository_root(code, repo_root):
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_import_follows_the_layers():
    problems = [problem for path in source_files() for problem in layer_violations(path, (REPO_ROOT / path).read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path, source, expected", [
    ("platform/core/metrics.py", "from msa.platform.training.loop import train_loop\n", "the core layer imports"),
    ("models/fine.py", "def f():\n    from msa.platform.data.readers import load_dataset\n", "the models layer imports"),
    ("platform/training/loop.py", "import msa.platform.sweep.driver\n", "the training layer imports"),
    ("platform/tracking/runs.py", "from msa.ensembles.build import build_ensembles\n", "the tracking layer imports"),
    ("platform/sweep/driver.py", "def f():\n    from msa.platform.core.errors import MsaError\n", "hoist it to the top"),
    ("platform/sweep/driver.py", "def f():\n    import json\n", "not a heavy package to defer"),
    ("ensembles/build.py", "from msa.platform import jobs\n", "the ensembles layer imports msa.platform.jobs"),
])
def test_the_layer_checker_fails_on_a_wrong_import(path, source, expected):
    problems = layer_violations(Path(path), source)
    assert problems and expected in problems[0], problems


def test_the_layer_checker_accepts_imports_down_and_deferred_heavy_ones():
    source = ("from msa.platform.core.errors import MsaError\nfrom msa.models.registry import MODELS\n"
              "def f():\n    import ray\n    from mlflow import MlflowClient\n")
    assert layer_violations(Path("platform/training/loop.py"), source) == []


def test_every_package_folder_is_listed_in_pyproject(repo_root):
    config = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    expected = set()
    for folder in PACKAGE_FOLDERS:
        for sub in [repo_root / folder, *(p for p in (repo_root / folder).rglob("*") if p.is_dir())]:
            if any(sub.glob("*.py")) or any(sub.glob("*.yaml")):
                expected.add("msa." + ".".join(sub.relative_to(repo_root).parts))
    assert listed == expected, f"missing: {sorted(expected - listed)}, not a folder: {sorted(listed - expected)}"
    assert {config["package-dir"][f"msa.{folder}"] for folder in PACKAGE_FOLDERS} == set(PACKAGE_FOLDERS)


@pytest.mark.parametrize("argv", [["--help"], ["leaderboard", "--help"], ["leaderboard", "nowhere", "--format", "md"]])
def test_light_commands_do_not_import_torch(argv, tmp_path):
    """`msa --help` and `msa leaderboard` import neither torch nor Ray nor MLflow."""
    probe = ("import sys\nfrom msa.platform.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed', 'matplotlib') if m in sys.modules)\n"
             "print('heavy:', ','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", probe, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "heavy:", proc.stdout[-2000:] + proc.stderr[-2000:]


def test_platform_files_and_functions_stay_small():
    problems = []
    for path in source_files():
        text = (REPO_ROOT / path).read_text()
        if path.parts[0] == "platform" and len(text.splitlines()) > MAX_PLATFORM_FILE_LINES:
            problems.append(f"{path}: {len(text.splitlines())} lines (at most {MAX_PLATFORM_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_REASON not in (ast.get_docstring(node) or ""):
                    problems.append(f"{path}:{node.lineno}: {node.name} has {length} lines and no reason in its docstring")
    assert not problems, "\n".join(problems)


def test_every_imported_package_is_declared(repo_root):
    """Each third-party package the source imports (at the top or deferred) is a dependency in
    pyproject.toml, not only something another dependency happens to bring."""
    from importlib.metadata import packages_distributions

    declared = {re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0].lower().replace("_", "-")
                for line in tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    missing = set()
    for path in source_files():
        for module, _, _ in imports(ast.parse((REPO_ROOT / path).read_text())):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("msa", "__future__"):
                continue
            if not {d.lower().replace("_", "-") for d in distributions.get(top, [top])} & declared:
                missing.add(f"{top} (imported by {path})")
    assert not missing, sorted(missing)
