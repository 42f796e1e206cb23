"""The whole loop on the flow-matching toy twin (toy-flow), through the real commands: preference
pairs sampled by the twin, a Flow-DPO LoRA from the shipped recipe, a realigned lambda grid under
the flow SDE (path KL per image), a lambda search and a report. Reduced sizes; CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from align_runs import align_env

ROOT = Path(__file__).resolve().parents[2]
DERADIFF = [sys.executable, "-m", "deradiff.cli"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=align_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_flow_twin_loop_prefs_flow_dpo_realigned_grid_search_report(tmp_path):
    prefs, run, ev = tmp_path / "prefs", tmp_path / "flow-dpo", tmp_path / "eval"
    _run([*DERADIFF, "toy", "make-prefs", "--family", "flow", "--out", str(prefs), "--pairs-per-prompt", "1",
          "--test-pairs-per-prompt", "1", "--steps", "2", "--corrupt", "0"])
    proc = _run([sys.executable, "train/align.py", "recipe=recipes/toy-flow-dpo.yaml", f"trainer.output_dir={run}",
                 f"data.path={prefs / 'train.parquet'}", f"data.eval_path={prefs / 'test.parquet'}",
                 "trainer.max_steps=3", "trainer.warmup_steps=0", "trainer.per_device_batch_size=4",
                 "trainer.eval_every=0", "trainer.sample_every=0", "trainer.log_every=1"])
    assert "flow target v = eps - x0" in proc.stdout + proc.stderr
    saved = json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").exists() else None
    assert saved is None or saved["model"]["max_sequence_length"] == 1
    _run([*DERADIFF, "evaluate", "--lora", str(run), "--out", str(ev), "--lam", "0", "1", "2",
          "--baseline", "lora-scale", "--prompts", "toy:test", "--max-prompts", "2", "--seeds", "0", "1",
          "--steps", "3", "--scheduler", "flow_sde", "--reward", "toy", "--n-boot", "50"])
    rows = [json.loads(line) for line in (ev / "results.jsonl").read_text().splitlines()]
    kl: dict[float, list[float]] = {}
    for r in rows:
        if r["arm"] == "realigned":
            kl.setdefault(r["lam_value"], []).append(r["path_kl"])
    assert sorted(kl) == [0.0, 1.0, 2.0] and all(len(v) == 4 for v in kl.values())  # 2 prompts x 2 seeds
    mean = {lam: sum(v) / len(v) for lam, v in kl.items()}
    assert mean[0.0] == 0 and 0 < mean[1.0] < mean[2.0]  # the reference drifts not at all; more with lambda
    _run([*DERADIFF, "search", "--out", str(ev), "--grid", "0", "1", "2", "--maximize", "reward/toy",
          "--max-path-kl", str(mean[2.0] * 0.99), "--refine", "0", "--n-boot", "50"])
    search = json.loads((ev / "search.json").read_text())
    assert search["chosen_lambda"] in (0.0, 1.0)  # lambda 2 breaks the path-KL budget
    _run([*DERADIFF, "report", "--eval", str(ev), "--n-boot", "50"])
    assert (ev / "report" / "grid.png").stat().st_size > 0
