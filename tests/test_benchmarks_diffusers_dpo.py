"""benchmarks/diffusers_dpo.py's pure parts: how it names the example's version, patches it,
reads step times from both tools' files, and turns runs into medians and ratios. (The runs
themselves need diffusers' example script, which is not part of this repository.)"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffusers_dpo as bench  # noqa: E402


def test_git_blob_id_is_gits():
    assert bench.git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # `git hash-object /dev/null`
    assert bench.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_example_source_patches_only_the_wandb_import(tmp_path):
    example = tmp_path / "train_diffusion_dpo.py"
    example.write_text("import torch\nimport wandb\nfrom x import wandb_thing\n")
    src, patches = bench.example_source(str(example), have_wandb=False)
    assert src == "import torch\n" + bench.WANDB_PATCH[1] + "from x import wandb_thing\n"
    assert len(patches) == 1
    assert bench.example_source(str(example), have_wandb=True) == (example.read_text(), [])
    example.write_text("import torch\n")  # not the example: refused, not silently run unpatched
    with pytest.raises(RuntimeError, match="expected one line"):
        bench.example_source(str(example), have_wandb=False)


def test_step_times_from_both_tools_files(tmp_path):
    (tmp_path / "steps.txt").write_text("10.0\n12.5\n13.0\n\n")  # bar created, then 2 updates
    assert bench.example_steps(tmp_path / "steps.txt") == [2.5, 0.5]
    rows = [{"step": i, "perf/sec_per_step": s, "dpo/loss": 0.69, "perf/peak_mem_mib": 100.0 + i}
            for i, s in ((1, 3.0), (2, 2.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.our_steps(tmp_path) == ([3.0, 2.0], [0.69, 0.69], 102.0)


def _run(tool, repeat, steps, peak, losses=()):
    return {"tool": tool, "repeat": repeat, "steps_s": steps, "peak_rss_mib": peak, "steps_rss_mib": peak - 10,
            "wall_s": sum(steps) + 5, "losses": list(losses)}


def test_summarize_skips_the_first_step_and_takes_ratios():
    runs = [_run("example", 0, [9.0, 4.0, 4.0], 1000.0), _run("cached", 0, [9.0, 3.0, 3.0], 700.0, [0.5, 0.6, 0.7]),
            _run("uncached", 0, [9.0, 4.0, 5.0], 1100.0, [0.5, 0.6, 0.7005]),
            _run("example", 1, [9.0, 6.0, 6.0], 1000.0), _run("cached", 1, [9.0, 3.0, 3.0], 800.0, [0.5, 0.6, 0.7]),
            _run("uncached", 1, [9.0, 4.0, 4.0], 1000.0, [0.5, 0.6, 0.7]),
            _run("split", 0, [9.0, 3.5, 3.5], 850.0, [0.5, 0.6, 0.7002])]
    tools, summary = bench.summarize(runs)
    assert tools["example"]["step_s"] == 5.0 and tools["example"]["first_step_s"] == 9.0
    assert tools["cached"]["step_s"] == 3.0 and tools["cached"]["peak_rss_mib"] == 750.0
    assert summary["cached/step_s_vs_example"] == pytest.approx(0.6)
    assert summary["cached/step_s_vs_example_per_repeat"] == pytest.approx([0.75, 0.5])
    assert summary["cached/peak_rss_mib_vs_example"] == pytest.approx(0.75)
    assert summary["uncached/step_s_vs_example"] == pytest.approx(0.8)
    assert summary["target_step_0.85_met"] and summary["target_memory_0.8_met"]
    assert summary["cached_vs_uncached_max_loss_diff"] == pytest.approx(5e-4)
    assert summary["split/peak_rss_mib_vs_example"] == pytest.approx(0.85)
    assert not summary["split/target_memory_0.8_met"]
    assert summary["cached_vs_split_max_loss_diff"] == pytest.approx(2e-4)
    table = bench.format_table(tools, summary)
    assert "step_s vs example" in table and "0.600x" in table


def test_summarize_without_the_example_has_no_ratios():
    tools, summary = bench.summarize([_run("cached", 0, [2.0, 1.0], 500.0)])
    assert list(tools) == ["cached"] and summary == {}


def test_our_recipe_matches_the_examples_command_line(tmp_path):
    from deradiff.training.recipe_load import load_recipe

    args = Namespace(resolution=128, steps=3, lr=2e-5, rank=8, gradient_checkpointing=True)
    recipe = load_recipe(None, [f"{section}.{k}={json.dumps(v)}" for section, keys in
                                bench.recipe_dict(tmp_path, args).items() for k, v in keys.items()])
    line = bench.example_args(tmp_path, tmp_path / "run", args)

    def flag(name):
        return line[line.index(name) + 1]

    assert recipe.data.resolution == int(flag("--resolution")) == 128
    assert recipe.trainer.max_steps == int(flag("--max_train_steps")) == 3
    assert recipe.trainer.lr == float(flag("--learning_rate"))
    assert recipe.lora.rank == int(flag("--rank")) and recipe.lora.alpha is None  # alpha = rank, as the example's
    assert list(recipe.lora.target_modules) == bench.LORA_TARGETS
    assert recipe.trainer.per_device_batch_size == int(flag("--train_batch_size")) == 1
    assert recipe.method.beta == float(flag("--beta_dpo")) and recipe.method.beta_convention == "diffusers"
    assert recipe.model.gradient_checkpointing and "--gradient_checkpointing" in line
    assert recipe.data.num_workers == int(flag("--dataloader_num_workers")) == 0
