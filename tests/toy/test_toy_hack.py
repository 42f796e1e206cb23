"""`deradiff toy hack`: the trade-off command runs and shows reward up, fidelity down."""

from __future__ import annotations

import json

import pytest
from PIL import Image


def test_hack_command_shows_the_trade_off(tmp_path):
    from deradiff.cli import main

    out = tmp_path / "hack"
    args = ["toy", "hack", "--prompts", "test", "--per-prompt", "2", "--leash", "10", "0",
            "--steps", "100", "--examples", "4", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "hack.json").read_text())
    strong, none = result["records"]
    assert result["n_images"] == 24 and strong["leash"] == 10 and none["leash"] == 0
    assert none["reward"][0] > 0.8 > strong["reward"][0]
    assert none["fidelity/adherence"][0] < 0.5 <= strong["fidelity/adherence"][0]
    assert none["fidelity/kid"][1] > strong["fidelity/kid"][2]  # intervals apart
    assert none["rmsd"] > strong["rmsd"]
    for name in ("hack.png", "grid.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] == 16 + 2 * (128 + 2)  # column labels + one row per leash strength


@pytest.mark.parametrize("flag, value, match", [
    ("--per-prompt", "1", "per-prompt"),
    ("--leash", "-1", "leash"),
    ("--steps", "0", "steps"),
])
def test_bad_input(tmp_path, capsys, flag, value, match):
    from deradiff.cli import main

    assert main(["toy", "hack", "--out", str(tmp_path / "o"), flag, value]) == 2
    assert match in capsys.readouterr().err


def test_hack_from_pipeline_samples(tmp_path):
    """--source pipeline: starting images come from a toy pipeline folder (random weights here)."""
    from deradiff.cli import main
    from deradiff.toy.pipeline import build_toy_pipeline
    from deradiff.toy.store import write_manifest

    root = tmp_path / "assets"
    build_toy_pipeline(seed=0).save_pretrained(str(root / "pipeline"), safe_serialization=True)
    write_manifest(root)
    out = tmp_path / "hack"
    args = ["toy", "hack", "--source", "pipeline", "--pipeline", str(root), "--prompts", "test",
            "--per-prompt", "2", "--leash", "1", "0", "--steps", "20", "--out", str(out)]
    assert main(args) == 0
    records = json.loads((out / "hack.json").read_text())["records"]
    assert records[1]["reward"][0] > records[0]["reward"][0]
