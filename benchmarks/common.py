"""Plumbing shared by the benchmarks: one subprocess per approach, one JSON file per run."""

from __future__ import annotations

import argparse
import json
import resource
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
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return args, None
    return args, run_workers(script, list(approaches), args)


def run_workers(script: str, approaches: list[str], args: Namespace) -> dict[str, dict]:
    """Run `script --worker NAME` with the same options for each approach, each in a fresh
    process (clean peak-memory accounting); each worker prints its result as the last line."""
    results = {}
    for approach in approaches:
        cmd = [sys.executable, script, "--worker", approach] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "out")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:  # the worker's own error, not only "exit status 1"
            raise RuntimeError(f"worker {approach} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        results[approach] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def write_results(path: str, args: Namespace, results: dict, summary: dict, **sections) -> None:
    """{"config", "results", "summary", *sections} as JSON at `path`, written atomically."""
    write_text_atomic(path, json.dumps({"config": {k: v for k, v in vars(args).items() if k != "worker"},
                                        "results": results, "summary": summary, **sections}, indent=2))
