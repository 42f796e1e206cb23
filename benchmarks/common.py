"""Plumbing shared by the benchmarks: one subprocess per approach, one JSON file per run."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

from deradiff.io import write_text_atomic


def run_workers(script: str, approaches: list[str], args: Namespace) -> dict[str, dict]:
    """Run `script --worker NAME` with the same options for each approach, each in a fresh
    process (clean peak-memory accounting); each worker prints its result as the last line."""
    results = {}
    for approach in approaches:
        cmd = [sys.executable, script, "--worker", approach] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "out")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[approach] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def write_results(path: str, args: Namespace, results: dict, summary: dict) -> None:
    """{"config", "results", "summary"} as JSON at `path`, written atomically."""
    write_text_atomic(path, json.dumps({"config": {k: v for k, v in vars(args).items() if k != "worker"},
                                        "results": results, "summary": summary}, indent=2))
