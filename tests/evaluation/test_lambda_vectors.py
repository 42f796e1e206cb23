"""Lambda vectors through the CLI: `deradiff sample` / `deradiff evaluate` with several named LoRAs
(--lora NAME=PATH ...) on the shipped toy pipeline, two random LoRAs saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deradiff.cli import main
from deradiff.evaluation.lams import Lam, parse_lam
from deradiff.evaluation.sampling import CPU_MIXED_BATCH_MAX_ROWS, choose_mode
from deradiff.models import load_pipeline, save_lora
from tests.conftest import add_random_lora

PROMPT = "a red circle on a dark background"
FAST = ["--steps", "2", "--scheduler", "ddpm", "--mode", "mixed_batch"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    pipe = load_pipeline("toy")
    add_random_lora(pipe.unet, seed=1)
    save_lora(pipe, root / "color")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a second, different LoRA on the same targets
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_lora(pipe, root / "contrast")
    return root


def _sample(out, lora_args, lams, *extra):
    return main(["sample", "--pipeline", "toy", "--lora", *lora_args, "--lam", *lams, "--prompt", PROMPT,
                 "--seeds", "0", *FAST, "--out", str(out), *extra])


def _pixels(path):
    return np.asarray(Image.open(path), dtype=np.float64)


def test_vector_corners_reproduce_single_lora_sampling(loras, tmp_path):
    named = [f"color={loras / 'color'}", f"contrast={loras / 'contrast'}"]
    assert _sample(tmp_path / "vec", named, ["contrast=0,color=1", "color=0,contrast=0.5"]) == 0
    assert _sample(tmp_path / "one", [str(loras / "color")], ["1"]) == 0
    vec = [json.loads(x) for x in (tmp_path / "vec" / "samples.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    assert [r["lam"] for r in vec] == ["color=1,contrast=0", "color=0,contrast=0.5"]  # canonical keys
    assert (tmp_path / "vec" / "images" / "lam=color=1,contrast=0").is_dir()
    corner = _pixels(tmp_path / "vec" / vec[0]["image"])
    assert np.abs(corner - _pixels(tmp_path / "one" / one[0]["image"])).max() <= 1e-5
    assert vec[0]["path_kl"] == pytest.approx(one[0]["path_kl"], rel=1e-5, abs=1e-8)
    assert vec[1]["path_kl"] > 0 and vec[0]["mode"] == "mixed_batch"


@pytest.mark.parametrize("lora_args,lams,message", [
    (["named"], ["color=1,style=1"], "names adapter 'style', not loaded"),
    (["named"], ["color=-0.5,contrast=1"], "lambda of adapter 'color' must be >= 0"),
    (["named"], ["color=inf,contrast=1"], "finite"),
    (["named"], ["1"], "is one lambda but 2 LoRAs are loaded"),
    (["plain"], ["color=1"], "is a lambda vector: load named LoRAs"),
    (["plain", "plain"], ["1"], "--lora got 2 paths"),
    (["plain", "named"], ["1"], "mixes a plain path"),
])
def test_bad_vectors_are_one_line_errors(loras, tmp_path, capsys, lora_args, lams, message):
    items = {"named": [f"color={loras / 'color'}", f"contrast={loras / 'contrast'}"], "plain": [str(loras / "color")]}
    argv = [x for key in lora_args for x in items[key]]
    try:
        code = _sample(tmp_path / "out", argv, lams)
    except SystemExit as exit_:  # argparse's usage error (a --lam value refused by its type)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "samples.jsonl").exists()


def test_mixed_batch_rule_counts_one_plus_k_rows():
    bound = 2 * CPU_MIXED_BATCH_MAX_ROWS  # rows of the mixed call: (1 + K) x rows
    assert choose_mode(2, "cpu", adapters=bound // 2 - 1) == "mixed_batch"  # exactly the bound
    assert choose_mode(2, "cpu", adapters=bound // 2) == "two_forward"  # 2 rows over
    assert choose_mode(bound // 3, "cpu", adapters=2) == "mixed_batch"
    assert choose_mode(bound // 3 + 1, "cpu", adapters=2) == "two_forward"
    lam = parse_lam("b=1,a=linear:0,2")
    assert isinstance(lam, Lam) and lam.name == "a=linear:0,2,b=1" and lam.adapters == 2 and lam.value is None
    assert parse_lam(lam.name) == lam


def _evaluate(loras, out, *extra):
    return main(["evaluate", "--pipeline", "toy", "--lora", f"color={loras / 'color'}",
                 f"contrast={loras / 'contrast'}", "--lam", "contrast=0.5,color=1", "color=0,contrast=0",
                 "--max-prompts", "1", "--seeds", "0", "--steps", "2", "--scheduler", "ddpm", "--fidelity", "none",
                 "--reward", "toy", "--n-boot", "20", "--out", str(out), *extra])


def test_evaluate_writes_vector_keyed_rows_and_resumes(loras, tmp_path, capsys):
    from deradiff.evaluation.results import RESULTS, lam_value, lam_vector, read_rows

    out = tmp_path / "eval"
    assert _evaluate(loras, out) == 0, capsys.readouterr().err
    rows = read_rows(out / RESULTS)
    assert sorted(r["lam"] for r in rows) == ["color=0,contrast=0", "color=1,contrast=0.5"]
    assert all(r["arm"] == "realigned" and r["lam_value"] is None for r in rows)
    kl = {r["lam"]: r["path_kl"] for r in rows}
    assert kl["color=0,contrast=0"] == 0.0 and kl["color=1,contrast=0.5"] > 0
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert sorted(r["lam"] for r in summary) == sorted(kl) and all(r["lam_value"] is None for r in summary)
    assert lam_value("color=1,contrast=0.5") is None and lam_vector("contrast=0.5,color=1") == {
        "color": 1.0, "contrast": 0.5}
    capsys.readouterr()
    assert _evaluate(loras, out) == 0  # resumes: nothing left to sample
    assert "(0 sampled now" in capsys.readouterr().out
    assert len(read_rows(out / RESULTS)) == 2
    assert main(["report", "--eval", str(out), "--n-boot", "20"]) == 0  # vector rows: tables, no crash
    assert "color=1,contrast=0.5" in "".join(p.read_text() for p in (out / "report").glob("*.md"))


@pytest.mark.parametrize("extra,message", [
    (["--baseline", "lora-scale"], "realigned arm only"),
    (["--lam", "1"], "is one lambda but 2 LoRAs are loaded"),
    (["--lam", "color=1,tone=1"], "names adapter 'tone', not loaded"),
])
def test_evaluate_refuses_vectors_it_cannot_sample(loras, tmp_path, capsys, extra, message):
    assert _evaluate(loras, tmp_path / "eval", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "eval" / "results.jsonl").exists()


def test_search_refuses_a_folder_of_named_loras(loras, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--lora", f"color={loras / 'color'}", f"contrast={loras / 'contrast'}", "--pipeline", "toy",
            "--max-prompts", "1", "--seeds", "0", "--fidelity", "none", "--out", str(out)]
    assert main(["search", *argv, "--maximize", "reward/toy", "--refine", "0"]) == 2
    err = capsys.readouterr().err
    assert "search them with --grid-vector NAME=V1,V2,... per adapter, e.g. --grid-vector color=0,1,2 contrast=0,1,2" \
        in err and err.count("\n") == 1
    assert main(["search", *argv, "--grid", "color=1,contrast=1", "--maximize", "reward/toy"]) == 2
    assert "constant lambdas only" in capsys.readouterr().err
