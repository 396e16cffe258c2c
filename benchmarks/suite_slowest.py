"""The slowest tests of two pytest runs side by side, as a Markdown table, read from each run's
``--durations`` report (the console log of `make test` or `bash .ci/run`, which asks for 25).

    .venv/bin/python benchmarks/suite_slowest.py BEFORE.log AFTER.log [--top 25]

Each row is one rank: the test (its phase, ``setup`` when a fixture it starts is what took the
time) and its seconds in the run before, then in the run after; a test name pytest-xdist
suffixed with its group (``@ray``) is shown without it. Below the table, each run's pytest total.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

DURATION = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(.+)$")
TOTAL = re.compile(r" in (\d+\.\d+)s \((\d+:\d+:\d+)\) =+$")


def slowest(log: Path) -> tuple[list[tuple[float, str, str]], str]:
    """(seconds, phase, test) of the run's durations report, slowest first, and its total line."""
    text = log.read_text(errors="replace")
    report = text[text.rfind("slowest"):]
    rows = []
    for line in report.splitlines()[1:]:
        match = DURATION.match(line.strip())
        if not match:
            break
        seconds, phase, test = match.groups()
        rows.append((float(seconds), phase, test.removesuffix("@ray")))
    total = next((m.group(2) for m in map(TOTAL.search, reversed(text.splitlines())) if m), "?")
    return rows, total


def short(test: str) -> str:
    return test.removeprefix("tests/").replace(".py::", " :: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    (before, before_total), (after, after_total) = slowest(args.before), slowest(args.after)
    print("| # | before | s | after | s |")
    print("| ---: | --- | ---: | --- | ---: |")
    for rank in range(args.top):
        cells = []
        for rows in (before, after):
            seconds, phase, test = rows[rank] if rank < len(rows) else (float("nan"), "", "")
            cells += [f"{short(test)} ({phase})" if test else "", f"{seconds:.1f}" if test else ""]
        print(f"| {rank + 1} | " + " | ".join(cells) + " |")
    for label, rows, total in (("before", before, before_total), ("after", after, after_total)):
        print(f"\n{label}: the {min(args.top, len(rows))} slowest sum to {sum(r[0] for r in rows[:args.top]):.0f} s; "
              f"pytest took {total}")


if __name__ == "__main__":
    main()
