"""Plumbing shared by the benchmarks: one subprocess per approach, one JSON file per run."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable

from deradiff.io import write_text_atomic


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_and_run(p: argparse.ArgumentParser, script: str, approaches: tuple[str, ...], worker: Callable,
                  argv=None) -> tuple[Namespace, dict[str, dict] | None]:
    """Parse the benchmark's options (adding the hidden --worker); in a worker process, run
    `worker(approach, args)` and print its JSON (returns results None); otherwise run every
    approach in its own process and return their results."""
    p.add_argument("--worker", choices=approaches, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every approach's process this many times, in rotated order, and take medians (the "
                        "processes run one after another: rounds spread a drifting machine over all approaches)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return args, None
    return args, run_workers(script, list(approaches), args)


def run_workers(script: str, approaches: list[str], args: Namespace) -> dict[str, dict]:
    """Run `script --worker NAME` with the same options for each approach, each in a fresh
    process (clean peak-memory accounting); each worker prints its result as the last line.
    With args.rounds > 1 every approach runs that many times, round r starting at approach r
    (mod the count), and its numbers are the medians over its rounds (see median_result)."""
    runs: dict[str, list[dict]] = {a: [] for a in approaches}
    for r in range(getattr(args, "rounds", 1)):
        for approach in approaches[r % len(approaches):] + approaches[:r % len(approaches)]:
            cmd = [sys.executable, script, "--worker", approach] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "out", "rounds")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:  # the worker's own error, not only "exit status 1"
                raise RuntimeError(f"worker {approach} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            runs[approach].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {a: median_result(rs) for a, rs in runs.items()}


def median_result(rounds: list[dict]) -> dict:
    """One approach's result over its rounds: the median of every numeric field, the first
    round's other fields, and (with several rounds) the rounds themselves under "rounds"."""
    if len(rounds) == 1:
        return rounds[0]
    merged = {}
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        merged[key] = statistics.median(values) if numeric else value
    return {**merged, "rounds": rounds}


def write_results(path: str, args: Namespace, results: dict, summary: dict, **sections) -> None:
    """{"config", "results", "summary", *sections} as JSON at `path`, written atomically."""
    write_text_atomic(path, json.dumps({"config": {k: v for k, v in vars(args).items() if k != "worker"},
                                        "results": results, "summary": summary, **sections}, indent=2))
