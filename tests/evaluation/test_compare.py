"""`deradiff compare` on synthetic validation records whose gaps and path-KL growth are known."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.compare import build_comparison, log_slope
from deradiff.evaluation.results import write_json

LAMS = (0.25, 0.5, 1.0, 2.0, 4.0)


def record(gap: float, retrained_power: float) -> dict:
    """A validation record: reward gap `gap` at every lambda but 1; path KL 10 lambda^2 realigned,
    10 lambda^retrained_power retrained; a matching record whose KID passes 3 of 4."""
    comps = []
    for lam in LAMS:
        g = 0.0 if lam == 1.0 else gap
        comps.append({"baseline": f"lambda-{lam:g}", "lam": lam, "beta": 1000 / lam, "metric": "reward/toy",
                      "realigned": [0.5 + g, 0.4 + g, 0.6 + g], "retrained": [0.5, 0.4, 0.6],
                      "gap": [g, g - 0.01, g + 0.01], "in_baseline_ci": abs(g) <= 0.1, "gap_ci_has_zero": g == 0.0})
        real, ret = 10 * lam**2, 10 * lam**retrained_power
        comps.append({"baseline": f"lambda-{lam:g}", "lam": lam, "beta": 1000 / lam, "metric": "path_kl",
                      "realigned": [real, 0.9 * real, 1.1 * real], "retrained": [ret, 0.9 * ret, 1.1 * ret],
                      "gap": [real - ret, real - ret - 1, real - ret + 1], "in_baseline_ci": False,
                      "gap_ci_has_zero": False})
    rows = [{"lam": lam, "fraction": 0.2 * i, "width_over_spacing": 0.5, "passed": i > 0}
            for i, lam in enumerate(lam for lam in LAMS if lam != 1.0)]
    matching = {"primary": "kid", "distances": {"kid": {"accuracy": [3, 4], "rows": rows,
                                                        "resolution": {"large_enough": True}}}}
    return {"alpha": 0.05, "beta0": 1000.0, "comparisons": comps, "matching": matching,
            "compute": {"sweep_train_s": 100.0}}


@pytest.fixture
def folders(tmp_path):
    out = []
    for name, gap, power in (("short", 0.08, 1.0), ("long", 0.02, 1.5)):
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "validation.json", record(gap, power))
        out.append(folder)
    return out


def test_log_slope_recovers_the_power():
    assert log_slope(LAMS, [3 * lam**2 for lam in LAMS]) == pytest.approx(2.0)
    assert log_slope(LAMS, [3 * lam**0.7 for lam in LAMS]) == pytest.approx(0.7)
    assert log_slope([1.0, 2.0], [0.0, 5.0]) is None  # one positive point is no slope


def test_compare_reports_gaps_matching_and_path_kl_growth(folders, tmp_path):
    out = tmp_path / "cmp"
    text = build_comparison(folders, ["400 steps", "1600 steps"], out).read_text()
    summary = json.loads((out / "compare.json").read_text())["summaries"]
    # lambda 1 (the aligned LoRA itself) is no test: the mean |gap| is over the other four
    assert summary["400 steps"]["metrics"]["reward/toy"]["mean_abs_gap"] == pytest.approx(0.08)
    assert summary["1600 steps"]["metrics"]["reward/toy"]["mean_abs_gap"] == pytest.approx(0.02)
    assert summary["400 steps"]["path_kl_slope"] == pytest.approx({"realigned": 2.0, "retrained": 1.0})
    assert summary["1600 steps"]["path_kl_slope"]["retrained"] == pytest.approx(1.5)
    assert summary["400 steps"]["matching"]["kid"]["median_fraction"] == pytest.approx(0.3)
    assert "| kid | 3/4, 0.30 | 3/4, 0.30 |" in text
    assert "| 400 steps | 2.00 | 1.00 |" in text and "| 1600 steps | 2.00 | 1.50 |" in text
    assert "0.08 (in CI 4/4, gap 0 0/4)" in text
    assert len((out / "compare.csv").read_text().splitlines()) == 1 + 2 * 4 * 2  # labels x lambdas x metrics
    for name in ("gaps.png", "path_kl.png"):
        assert Image.open(out / name).width > 300


def test_compare_refuses_bad_input(folders, tmp_path, capsys):
    with pytest.raises(UserError, match="2 names for 1"):
        build_comparison(folders[:1], ["a", "b"], tmp_path / "x")
    with pytest.raises(UserError, match="distinct"):
        build_comparison(folders, ["a", "a"], tmp_path / "x")
    with pytest.raises(UserError, match="has no validation.json: run `deradiff validate"):
        build_comparison([tmp_path], ["a"], tmp_path / "x")
    write_json(folders[0] / "validation.json", {"kind": "vector", "comparisons": []})
    with pytest.raises(UserError, match="lambda vectors"):
        build_comparison(folders, ["a", "b"], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert main(["compare", "--eval", str(folders[1]), "--out", str(tmp_path / "y")]) == 0
    assert "long: matching (kid) 3/4; path-KL slope realigned 2.00, retrained 1.50" in capsys.readouterr().out
