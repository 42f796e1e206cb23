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
        (["--lam", "nan"], "finite"),
        (["--lam", "wiggle:0,1"], "unknown lambda schedule"),
        (["--lora", "/nonexistent/x.safetensors"], "does not exist"),
        (["--prompts-file", "/nonexistent.txt"], "prompts file"),
    ],
)
def test_bad_input_exits_non_zero_before_loading(saved, argv, message, capsys):
    base = ["sample", "--pipeline", str(saved / "pipe"), "--lora", str(saved / "lora"), "--prompt", "x"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_scheduler_is_rejected_by_the_parser(saved):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--pipeline", str(saved / "pipe"), "--scheduler", "fancy", "--prompt", "x"])
    assert exit_.value.code == 2
