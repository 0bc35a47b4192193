"""Paired, interleaved A/B timing of two checkouts (for noisy, shared machines).

Runs ``python -m <module> <args>`` alternately in checkout A and checkout B (A B A B …),
reads the last number each run prints (e.g. ``ms/step 85.1``) and reports the median of
the pairwise ratios A/B with its range, plus each side's median. Usage::

    python -m benchmarks.paired --a /path/new --b /path/old --pairs 5 -- \
        benchmarks.kfac_step --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys


def run(cwd: str, command: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, "-m", *command], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout
    return float(re.findall(r"[-+]?\d+(?:\.\d+)?", out)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="checkout A (the change)")
    parser.add_argument("--b", required=True, help="checkout B (the baseline)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    a_times, b_times, ratios = [], [], []
    for i in range(args.pairs):
        first, second = (args.a, args.b) if i % 2 == 0 else (args.b, args.a)
        t1, t2 = run(first, command), run(second, command)
        ta, tb = (t1, t2) if i % 2 == 0 else (t2, t1)
        a_times.append(ta)
        b_times.append(tb)
        ratios.append(ta / tb)
        print(f"pair {i}: A {ta:.2f} B {tb:.2f} A/B {ta / tb:.3f}", flush=True)
    print(
        f"A median {statistics.median(a_times):.2f}, B median {statistics.median(b_times):.2f}; "
        f"A/B median {statistics.median(ratios):.3f} (range {min(ratios):.3f}–{max(ratios):.3f}, "
        f"{args.pairs} pairs)"
    )


if __name__ == "__main__":
    main()
