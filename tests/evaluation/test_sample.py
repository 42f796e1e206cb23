"""`deradiff sample` end to end on a tiny pipeline saved to disk."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from deradiff.cli import main
from deradiff.models import save_lora


@pytest.fixture(scope="module")
def saved(tiny_sd15, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    adapted, base = tiny_sd15
    base.save_pretrained(root / "pipe")
    save_lora(adapted, root / "lora")
    return root


def test_sample_writes_images_grid_and_path_kl(saved, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--lam", "0", "1", "linear:0,2",
        "--prompt", "a red circle", "a blue square", "--seeds", "0", "1", "--steps", "3", "--size", "32",
        "--scheduler", "ddpm", "--out", str(out),
    ])
    assert code == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 2
    assert {r["lam"] for r in rows} == {"0", "1", "linear:0,2"}
    kl = {r["lam"]: r["path_kl"] for r in rows if r["seed"] == 0 and r["prompt"] == "a red circle"}
    assert kl["0"] == 0.0 and kl["1"] > 0
    grid = Image.open(out / "grid.png")
    assert grid.width >= 3 * 96 and grid.height >= 4 * 96  # 3 lambda columns, 4 prompt x seed rows
    assert all((out / r["image"]).exists() for r in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lora", "/nonexistent/x.safetensors"], "does not exist"),
        (["--prompts-file", "/nonexistent.txt"], "prompts file"),
    ],
)
def test_bad_input_exits_non_zero_before_loading(saved, argv, message, capsys):
    base = ["sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--prompt", "x"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lam", "nan"], "argument --lam: lambda must be a finite number, got 'nan'"),
        (["--lam", "1", "-0.5"], "argument --lam: lambda must be >= 0"),
        (["--lam", "linear:-1,2"], "argument --lam: lambda must be >= 0"),
        (["--lam", "wiggle:0,1"], "argument --lam: unknown lambda schedule"),
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["--steps", "-3"], "argument --steps: must be an integer >= 1, got '-3'"),
        (["--guidance", "-1"], "argument --guidance: must be >= 0, got '-1'"),
    ],
)
def test_bad_values_are_one_line_usage_errors(saved, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--prompt", "x", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_an_empty_prompts_file_is_named(saved, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing here\n\n")
    assert main(["sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--prompt", "x",
                 "--prompts-file", str(empty)]) == 2
    assert f"no prompts in '{empty}'" in capsys.readouterr().err


def test_earlier_samples_are_kept_unless_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--prompt", "a red circle",
            "--steps", "2", "--size", "32", "--out", str(out)]
    assert main([*argv, "--lam", "0"]) == 0
    before = {p: p.read_bytes() for p in [out / "grid.png", out / "samples.jsonl", out / "images/lam=0/p000_s0.png"]}
    assert main([*argv, "--lam", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds samples (samples.jsonl, grid.png, images)" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before  # nothing written over
    assert main([*argv, "--lam", "2", "--overwrite"]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["lam"] for r in rows] == ["2"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["lam=2"]  # the earlier run's images are replaced


def test_unknown_scheduler_is_rejected_by_the_parser(saved):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--pipeline", str(saved / "pipe"), "--scheduler", "fancy", "--prompt", "x"])
    assert exit_.value.code == 2
