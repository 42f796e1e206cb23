"""`deradiff evaluate` on a random-weight toy world saved to disk, and the reduced end-to-end run
evaluate -> search -> validate -> report that CI executes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.config import CONFIG, parse_reward_spec
from deradiff.evaluation.results import RESULTS, parse_shard, read_rows, shard_prompt_ids

PROMPTS = ["a red circle on a dark background", "a blue square on a light background"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one thread is fastest


def make_lora(root, name, beta, seed, strength=0.3, rank=4, base="toy", wall_s=100.0):
    """A toy-UNet LoRA with random B saved like a training run: NAME/lora/ (+ lora_info.json) and
    NAME/summary.json with its training wall time."""
    from deradiff.models import add_lora, save_lora
    from deradiff.toy.pipeline import build_toy_pipeline

    pipe = build_toy_pipeline(seed=0)
    add_lora(pipe.unet, rank=rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in pipe.unet.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=gen) * strength)
    save_lora(pipe, root / name / "lora", metadata={"beta": beta, "base": base, "method": "dpo"})
    (root / name / "summary.json").write_text(json.dumps({"step": 10, "wall_s": wall_s}))
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Random toy pipeline + classifier on disk, an aligned LoRA (beta0 = 1) and baselines at
    beta 2 and 0.5 (lambda 0.5 and 2), one of another rank and one of another base model."""
    from deradiff.toy.classifier import ShapeClassifier, save_classifier
    from deradiff.toy.pipeline import build_toy_pipeline

    root = tmp_path_factory.mktemp("world")
    build_toy_pipeline(seed=0).save_pretrained(root / "pipe")
    torch.manual_seed(0)
    save_classifier(ShapeClassifier(), root / "classifier")
    make_lora(root, "aligned", 1.0, seed=1)
    make_lora(root, "lambda-0.5", 2.0, seed=2, strength=0.15)
    make_lora(root, "lambda-2", 0.5, seed=3, strength=0.5)
    make_lora(root, "rank8", 0.25, seed=4, rank=8)
    make_lora(root, "otherbase", 0.25, seed=5, base="stable-diffusion-v1-5/stable-diffusion-v1-5")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def common(world, out, *extra):
    return ["--pipeline", str(world / "pipe"), "--lora", str(world / "aligned"), "--prompts", str(world / "prompts.txt"),
            "--seeds", "0", "1", "--steps", "2", "--guidance", "3", "--size", "32", "--scheduler", "ddpm",
            "--classifier", str(world / "classifier"), "--n-boot", "100", "--out", str(out), *extra]


def rows_by_key(out):
    return {(r["arm"], r["lam"], r["prompt_id"], r["seed"]): r for r in read_rows(out / RESULTS)}


# -- pure helpers ---------------------------------------------------------------------------------


def test_shards_partition_the_prompts():
    assert parse_shard(None) == (0, 1) and parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)
    for n_prompts in (1, 5, 12):
        ids = [i for s in range(3) for i in shard_prompt_ids(n_prompts, (s, 3))]
        assert ids == list(range(n_prompts))


def test_reward_spec():
    assert parse_reward_spec("toy") == ("toy", {})
    assert parse_reward_spec("hpsv2:version=v2.1,checkpoint=/m/h.pt") == ("hpsv2", {"version": "v2.1", "checkpoint": "/m/h.pt"})
    assert parse_reward_spec("pickscore:use_safetensors=false")[1] == {"use_safetensors": False}
    with pytest.raises(UserError, match="key=value"):
        parse_reward_spec("hpsv2:v2.1")


def test_torn_last_line_is_ignored_and_later_rows_win(tmp_path):
    row = {"arm": "realigned", "lam": "1", "prompt": "p", "seed": 0, "x": 1}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "x": 2}) + "\n" + '{"arm": "real')
    assert [r["x"] for r in read_rows(path)] == [2]
    path.write_text('{"arm": \n' + json.dumps(row) + "\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        read_rows(path)


# -- the command ----------------------------------------------------------------------------------


def test_evaluate_arms_resume_corruption_and_config_guard(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", *common(world, out), "--lam", "0", "1", "linear:0,2", "--baseline", "lora-scale"]
    assert main(argv) == 0
    rows = rows_by_key(out)
    assert len(rows) == (3 + 2) * 2 * 2  # realigned 3 lams + lora-scale 2 constant lams, 2 prompts x 2 seeds
    r0, r1 = rows[("realigned", "0", 0, 0)], rows[("realigned", "1", 0, 0)]
    assert r0["path_kl"] == 0.0 and r1["path_kl"] > 0
    assert {"reward/toy", "fidelity/adherence", "fidelity/color_acc", "time_s"} <= set(r0)
    # lam = 0 and lam = 1 are the reference and the aligned model: weight scaling agrees there exactly
    for lam in ("0", "1"):
        a = Image.open(out / rows[("realigned", lam, 1, 1)]["image"])
        b = Image.open(out / rows[("lora-scale", lam, 1, 1)]["image"])
        assert a.tobytes() == b.tobytes()
    assert r0["mode"] in ("two_forward", "mixed_batch")  # --mode auto, resolved per call
    record = json.loads((out / "summary.json").read_text())
    summary, sampling = record["summary"], record["sampling"]
    assert {(s["arm"], s["lam"]) for s in summary} >= {("realigned", "linear:0,2"), ("lora-scale", "1")}
    assert "fidelity/kid" in summary[0]  # per-prompt set metrics, from the 2 seeds' images
    assert sampling["images"] == len(rows) and sum(sampling["modes"].values()) == len(rows)
    assert sampling["images_per_s"] > 0 and sampling["realign_overhead"] > 0 and sampling["processes"] == 1

    # resume: nothing to do; then a truncated and a missing image are sampled again and counted
    assert main(argv) == 0
    assert "(0 sampled now" in capsys.readouterr().out
    broken = out / rows[("realigned", "1", 1, 0)]["image"]
    broken.write_bytes(broken.read_bytes()[:60])
    (out / rows[("lora-scale", "0", 0, 1)]["image"]).unlink()
    with open(out / RESULTS, "a") as f:  # a crash mid-append leaves a torn last line
        f.write('{"arm": "realigned", "la')
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "re-sampled 2 stored images" in text and "(2 sampled now" in text
    assert len(read_rows(out / RESULTS)) == len(rows)  # the torn line was cut, new rows start clean
    again = rows_by_key(out)
    assert again[("realigned", "1", 1, 0)]["reward/toy"] == pytest.approx(rows[("realigned", "1", 1, 0)]["reward/toy"], abs=1e-6)

    # a different sampler into the same folder is refused with the difference
    assert main(["evaluate", *common(world, out), "--lam", "1", "--steps", "3"]) == 2
    assert "steps: 2 -> 3" in capsys.readouterr().err


def test_shards_merge_to_the_unsharded_table(world, tmp_path, capsys):
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    assert main(["evaluate", *common(world, full), "--lam", "0.5"]) == 0
    for i in range(2):
        assert main(["evaluate", *common(world, sharded), "--lam", "0.5", "--shard", f"{i}/2"]) == 0
    assert not (sharded / RESULTS).exists()
    assert main(["evaluate", "--merge", "--out", str(sharded)]) == 0
    a, b = rows_by_key(full), rows_by_key(sharded)
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert b[key]["reward/toy"] == pytest.approx(a[key]["reward/toy"], abs=1e-3)
    shutil.rmtree(sharded / "shards")
    assert main(["evaluate", "--merge", "--out", str(sharded)]) == 2
    assert "no shard results" in capsys.readouterr().err


@pytest.mark.slow  # two worker processes start (imports, model loads): ~20 s on two busy cores
def test_devices_run_one_shard_per_process_with_the_rows_of_one_process(world, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--lam", "0.5", "--mode", "two_forward"]
    assert main(["evaluate", *common(world, one), *argv]) == 0
    assert main(["evaluate", *common(world, two), *argv, "--devices", "cpu,cpu"]) == 0
    assert "merged 4 rows of 2 processes (cpu, cpu)" in capsys.readouterr().out
    a, b = rows_by_key(one), rows_by_key(two)
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert b[key]["reward/toy"] == pytest.approx(a[key]["reward/toy"], abs=1e-4)
        assert b[key]["path_kl"] == pytest.approx(a[key]["path_kl"], rel=1e-4)
    sampling = json.loads((two / "summary.json").read_text())["sampling"]
    assert sampling["processes"] == 2 and sampling["images"] == 4
    assert not list((two / "shards").iterdir())  # merged, so the shard files went
    commands = (two / "commands.txt").read_text().splitlines()
    assert len(commands) == 1 and "--devices cpu,cpu" in commands[0]  # the workers' lines are not logged
    # resuming samples nothing; the workers find nothing to do and still merge
    assert main(["evaluate", *common(world, two), *argv, "--devices", "cpu,cpu"]) == 0
    assert "(0 sampled now" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lam", "1", "--devices", "cpu", "--shard", "0/2"], "leave out --shard"),
        (["--lam", "1", "--devices", "cuda:63"], "--devices: cuda:63 is not on this machine"),
        (["--lam", "1", "--devices", "tpu-ish"], "is not a device"),
        (["--lam", "1", "--devices", ","], "comma-separated"),
        (["--lam", "1", "--baselines", "{rank8}"], "LoRA rank 8 != aligned rank 4"),
        (["--lam", "1", "--baselines", "{otherbase}"], "base model 'stable-diffusion-v1-5"),
        (["--lam", "1", "--reward", "pickscor"], "unknown reward 'pickscor'"),
        (["--lam", "1", "--noise-level", "1"], "--noise-level sets the flow SDE's noise; it needs --scheduler flow_sde "
                                               "(got --scheduler ddpm)"),
    ],
)
def test_bad_input_is_refused_before_sampling(world, tmp_path, extra, message, capsys):
    extra = [e.format(rank8=world / "rank8", otherbase=world / "otherbase") for e in extra]
    out = tmp_path / "bad"
    assert main(["evaluate", *common(world, out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (out / RESULTS).exists()


def test_the_noise_level_enters_the_identity_only_when_given(world):
    from dataclasses import replace

    from deradiff.evaluation.config import EvalConfig

    plain = EvalConfig(lora=str(world / "aligned"), pipeline=str(world / "pipe"), fidelity="none")
    assert "noise_level" not in plain.identity()  # as folders sampled before the option: they resume
    sde = replace(plain, scheduler="flow_sde")
    assert "noise_level" not in sde.identity()  # the scheduler's default
    assert replace(sde, noise_level=1.0).identity() == {**sde.identity(), "noise_level": 1.0}


def test_a_failed_run_does_not_lock_its_folder(world, tmp_path, capsys):
    """A first run that fails on loading (no pipeline in the folder) leaves no identity behind:
    the corrected command runs, and the failed run's --steps is not taken as a default."""
    out, empty = tmp_path / "eval", tmp_path / "not-a-pipeline"
    empty.mkdir()
    failed = ["evaluate", *common(world, out), "--lam", "1"]
    failed[failed.index("--pipeline") + 1] = str(empty)
    assert main([*failed, "--steps", "3"]) == 2
    assert "cannot load pipeline" in capsys.readouterr().err
    assert not (out / CONFIG).exists() and not (out / RESULTS).exists()
    fixed = ["evaluate", *common(world, out), "--lam", "1"]
    fixed.remove("--steps"), fixed.remove("2")
    assert main(fixed) == 0, capsys.readouterr().err
    assert json.loads((out / CONFIG).read_text())["identity"]["steps"] is None
    assert len(read_rows(out / RESULTS)) == 2 * 2


def test_a_config_without_results_neither_binds_nor_informs(world, tmp_path, capsys):
    """A config.json left by a run that failed (older versions wrote it first) is replaced."""
    out = tmp_path / "eval"
    out.mkdir()
    (out / CONFIG).write_text(json.dumps({"identity": {"steps": 7}, "config": {"lora": "x", "steps": 7}}))
    assert main(["evaluate", *common(world, out), "--lam", "0"]) == 0, capsys.readouterr().err
    assert json.loads((out / CONFIG).read_text())["identity"]["steps"] == 2


def test_folders_from_before_named_judges_still_resume(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", *common(world, out), "--lam", "0.5"]
    assert main(argv) == 0
    saved = json.loads((out / CONFIG).read_text())
    assert saved["identity"]["fidelity"] == "toy"  # resolved from auto: the judge that accepts the prompts
    saved["identity"]["fidelity"] = True  # how earlier versions stored it
    (out / CONFIG).write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(argv) == 0 and "(0 sampled now" in capsys.readouterr().out


def test_end_to_end_evaluate_search_validate_report(world, tmp_path, capsys):
    """The reduced pipeline of the product on the toy world: every command, one folder."""
    out = tmp_path / "e2e"
    assert main(["evaluate", *common(world, out), "--lam", "0", "1", "2", "--baseline", "lora-scale"]) == 0
    assert main(["search", "--out", str(out), "--grid", "0", "1", "2", "--maximize", "reward/toy",
                 "--budget", "fidelity/shape_acc>=0", "--refine", "1", "--n-boot", "100"]) == 0
    search = json.loads((out / "search.json").read_text())
    assert search["chosen_lambda"] in [p["lam"] for p in search["evaluated"]] and len(search["evaluated"]) == 4
    chosen = search["chosen_lambda"]  # beta0 = 1: beta = 1 / lambda, none at lambda 0 (the reference)
    assert search["equivalent_beta"] == (None if chosen == 0 else pytest.approx(1.0 / chosen))
    assert search["cost"]["images"] == 4 * 4 and search["cost"]["sample_s"] > 0

    assert main(["validate", "--out", str(out), "--baselines", str(world / "lambda-0.5"), str(world / "lambda-2"),
                 "--n-boot", "100"]) == 0
    validation = json.loads((out / "validation.json").read_text())
    assert sorted(b["lam"] for b in validation["baselines"]) == [0.5, 2.0]
    reward = [c for c in validation["comparisons"] if c["metric"] == "reward/toy"]
    assert len(reward) == 2 and all("lora_scale_gap" in c for c in reward)
    # two baselines of 100 s of training each against the search's sampling time
    assert validation["compute"]["sweep_train_s"] == 200.0
    assert validation["compute"]["ratio"] == pytest.approx(200.0 / search["cost"]["sample_s"])

    assert main(["report", "--eval", str(out), "--n-boot", "100"]) == 0
    report = out / "report"
    text = (report / "report.md").read_text()
    assert f"Chosen lambda **{search['chosen_lambda']:g}**" in text and "## Validation" in text
    for name in ("reward_vs_lambda.png", "frontier.png", "grid.png", "summary.csv", "validation.csv"):
        assert (report / name).stat().st_size > 0
    assert "deradiff validate" in (out / "commands.txt").read_text()


def test_threads_option_sets_torch_threads_before_any_work(tmp_path):
    import torch

    from deradiff.cli import main

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    try:
        code = main(["evaluate", "--out", str(tmp_path / "e"), "--threads", str(target),
                     "--prompts", str(tmp_path / "missing.txt")])
        assert code == 2 and torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


# -- the judge interface --------------------------------------------------------------------------


class _ParityJudge:
    """A judge of another world: per image, whether the prompt has an even number of words."""

    def adherence(self, images, prompts):
        return {"even": torch.tensor([len(p.split()) % 2 == 0 for p in prompts])}

    def metrics(self, images, prompts, n_boot=1000, alpha=0.05, seed=0):
        raise AssertionError("one seed per prompt: no set metrics")


@pytest.fixture
def parity_judge(monkeypatch):
    from deradiff.plugins import JUDGES, JudgeEntry, load_plugins

    load_plugins()
    entry = JudgeEntry(accepts=lambda prompts: True, load=lambda weights=None, device="cpu": _ParityJudge(),
                       identity=lambda weights: {"parity_version": 1}, help="parity of the word count",
                       image_metrics={"even": "fidelity/even_words"}, set_metrics=("fidelity/spread",))
    monkeypatch.setitem(JUDGES, "parity", entry)
    return entry


def test_evaluation_reads_the_judge_columns_from_its_registry_entry(world, tmp_path, parity_judge):
    from deradiff.evaluation.config import EvalConfig, expected_metrics

    out = tmp_path / "eval"
    assert main(["evaluate", *common(world, out), "--lam", "1", "--seeds", "0", "--fidelity", "parity"]) == 0
    rows = read_rows(out / RESULTS)
    assert [r["fidelity/even_words"] for r in sorted(rows, key=lambda r: r["prompt_id"])] == [0.0, 0.0]
    assert not any(k.startswith("fidelity/") and k != "fidelity/even_words" for r in rows for k in r)
    cfg = EvalConfig(lora="x", prompts=PROMPTS, seeds=[0, 1], fidelity="parity")
    assert expected_metrics(cfg)[-2:] == ["fidelity/even_words", "fidelity/spread"]


def test_toy_judge_declares_the_columns_of_existing_results():
    from deradiff.plugins import judge_entry

    toy = judge_entry("toy")
    assert toy.image_metrics == {"color": "fidelity/color_acc", "shape": "fidelity/shape_acc",
                                 "background": "fidelity/background_acc", "all": "fidelity/adherence"}
    assert toy.set_metrics == ("fidelity/kid", "fidelity/diversity_rel")


@pytest.mark.parametrize("image_metrics, set_metrics", [({}, ()), ({"all": "adherence"}, ()),
                                                         ({"all": "fidelity/a"}, ("fidelity/a",))])
def test_a_judge_entry_declares_distinct_fidelity_metrics(image_metrics, set_metrics):
    from deradiff.plugins import JudgeEntry

    with pytest.raises(ValueError, match="metric"):
        JudgeEntry(accepts=bool, load=dict, identity=dict, help="", image_metrics=image_metrics, set_metrics=set_metrics)
