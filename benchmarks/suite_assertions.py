"""Counts the test suite's assertions, statically, so that two trees can be compared (a change
that merges or moves tests must not lose what they checked). Prints one JSON object.

    .venv/bin/python benchmarks/suite_assertions.py            # this tree's tests/
    .venv/bin/python benchmarks/suite_assertions.py OTHER/tests --per-test

An assertion is an ``assert`` statement, a ``pytest.raises`` block, or a call of a function
whose name starts with ``assert`` (``np.testing.assert_array_equal``, a helper such as
``assert_refused``); each is counted once where it is written, in test functions and in the
helpers they call alike (a parametrized test or a helper called from a loop counts once).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def assertions(node: ast.AST) -> int:
    count = 0
    for child in ast.walk(node):
        if isinstance(child, ast.Assert):
            count += 1
        elif isinstance(child, ast.Call):
            function = child.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name.startswith("assert") or name == "raises":
                count += 1
    return count


def census(tests: Path) -> dict:
    files, per_test = {}, {}
    for path in sorted(tests.rglob("*.py")):
        tree = ast.parse(path.read_text())
        relative = str(path.relative_to(tests.parent))
        files[relative] = assertions(tree)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                per_test[f"{relative}::{node.name}"] = assertions(node)
    return {"tests_dir": str(tests), "assertions": sum(files.values()), "test_functions": len(per_test),
            "in_test_functions": sum(per_test.values()), "by_file": files, "per_test": per_test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="?", default=str(Path(__file__).resolve().parents[1] / "tests"))
    parser.add_argument("--per-test", action="store_true", help="also list each test function's count")
    args = parser.parse_args()
    result = census(Path(args.tests).resolve())
    if not args.per_test:
        result.pop("per_test")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
