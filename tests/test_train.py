"""train/align.py end to end on a toy-shaped pipeline: outputs, exact resume after SIGKILL and
after a preemption signal, refusal of a different recipe, and 1 process == 2 processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from align_runs import align_env, dpo_losses

ROOT = Path(__file__).resolve().parents[1]
ALIGN = ROOT / "train" / "align.py"


def _args(toy_world, out, **over) -> list[str]:
    base = {
        "model.name_or_path": str(toy_world / "pipe"),
        "data.source": "parquet",
        "data.path": str(toy_world / "prefs" / "train.parquet"),
        "data.eval_path": str(toy_world / "prefs" / "test.parquet"),
        "method.beta": 2000,
        "trainer.output_dir": str(out),
        "trainer.max_steps": 6,
        "trainer.per_device_batch_size": 4,
        "trainer.warmup_steps": 0,
        "trainer.log_every": 1,
        "trainer.checkpoint_every": 2,
        "trainer.eval_every": 0,
        "trainer.sample_every": 0,
        "sample.images_per_prompt": 1,
        "sample.num_inference_steps": 3,
    }
    base.update(over)
    return ["recipe=recipes/toy-dpo.yaml", *(f"{k}={v}" for k, v in base.items())]


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ALIGN), *args], cwd=ROOT, env=align_env(), capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def reference_run(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(_args(toy_world, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_outputs_of_a_dpo_run(reference_run, toy_world):
    out, proc = reference_run
    assert (out / "recipe.yaml").exists() and (out / "summary.json").exists()
    assert sorted(dpo_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000006"]
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/dpo/implicit_acc" in summary and 0 <= summary["eval/dpo/implicit_acc"] <= 1
    assert 0 <= summary["eval/dpo/ranking_acc"] <= 1
    assert "global batch 4 = 4 per device x 1 processes x 1 accumulation" in proc.stdout + proc.stderr
    assert (out / "samples" / "step-000006.png").exists()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_world / "pipe"))
    before = pipe.unet.conv_out.weight.clone()
    pipe.load_lora_weights(str(out / "lora"))  # stock diffusers reads the trained LoRA
    assert torch.equal(before, pipe.unet.conv_out.weight)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_sigkill_then_rerun_gives_identical_losses(reference_run, toy_world, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ALIGN), *_args(toy_world, out)], cwd=ROOT, env=align_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and 5 not in (dpo_losses(out) if (out / "metrics.jsonl").exists() else {}):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")][-1] <= "step-000004"
    rerun = _run(_args(toy_world, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    assert dpo_losses(out) == dpo_losses(ref_out)  # bit-identical, steps 1..6


def test_preemption_signal_checkpoints_and_exits_75_then_resumes(reference_run, toy_world, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, str(ALIGN), *_args(toy_world, out, **{"trainer.checkpoint_every": 100})],
                            cwd=ROOT, env=align_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-2000:]
    stopped_at = max(dpo_losses(out))
    assert stopped_at < 6 and (out / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    rerun = _run(_args(toy_world, out, **{"trainer.checkpoint_every": 100}))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert dpo_losses(out) == dpo_losses(ref_out)


def test_streamed_data_trains_past_an_epoch_and_resumes_identically(toy_world, tmp_path):
    # 48 pairs (a few ties and corrupt rows dropped), 4 per step: step 14 is in the second pass.
    over = {"data.streaming": "true", "trainer.max_steps": 14, "trainer.checkpoint_every": 7,
            "trainer.log_every": 7, "sample.prompts": "[]"}
    whole = _run(_args(toy_world, tmp_path / "whole", **over))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "streamed, a shard per rank" in whole.stdout + whole.stderr
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["train/epoch"] == 1
    first = _run(_args(toy_world, tmp_path / "split", **{**over, "trainer.max_steps": 7}))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = _run(_args(toy_world, tmp_path / "split", **over))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr, rest.stderr[-3000:]
    assert dpo_losses(tmp_path / "split") == dpo_losses(tmp_path / "whole")
    assert sorted(dpo_losses(tmp_path / "whole")) == [7, 14]


def _with_corrupt_rows(src: Path, dst: Path, rows: tuple[int, ...]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src).to_pydict()
    for i in rows:
        table["jpg_0"][i] = b"\x89PNG\r\n\x1a\n not an image"
    pq.write_table(pa.table(table), dst)
    return dst


def test_corrupt_images_are_counted_in_log_metrics_and_summary_streamed_or_not(toy_world, tmp_path):
    # 48 pairs: 4 ties, 3 corrupt (rows 0, 10, 20, none a tie) -> 41 usable; 12 steps x 4 pairs
    # read the whole stream once.
    data = _with_corrupt_rows(toy_world / "prefs" / "train.parquet", tmp_path / "corrupt.parquet", (0, 10, 20))
    for streaming, steps in (("true", 12), ("false", 2)):
        out = tmp_path / f"streaming-{streaming}"
        proc = _run(_args(toy_world, out, **{"data.path": data, "data.streaming": streaming, "data.eval_path": "null",
                                             "trainer.max_steps": steps, "trainer.checkpoint_every": 100,
                                             "sample.prompts": "[]"}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        counts = [r["data/corrupt"] for r in rows]
        assert counts == sorted(counts), "counts only grow"
        assert summary["data/corrupt"] == rows[-1]["data/corrupt"] == 3, (streaming, summary)
        assert summary["data/ties"] == 4
        assert "data/corrupt=3" in proc.stdout + proc.stderr
        if streaming == "true":
            assert (proc.stdout + proc.stderr).count("skipping streamed row") >= 3
            assert summary["data/pairs_read"] >= 48 and summary["data/kept"] >= 41
        else:
            assert summary["data/pairs_read"] == 48 and summary["data/kept"] == 41


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_real_full_disk_is_one_line_and_the_rerun_fails_the_same_way(reference_run, toy_world, tmp_path):
    """The run directory on a tmpfs (in a user namespace) that holds one checkpoint, not two."""
    small = tmp_path / "small"
    small.mkdir()
    if not _can_mount_tmpfs(small):
        pytest.skip("cannot mount a tmpfs here (unshare -rm with mount not permitted)")
    ref_out, _ = reference_run
    size_kb = sum(f.stat().st_size for f in (ref_out / "checkpoints" / "step-000004").iterdir()) // 1024
    out = small / "run"
    args = _args(toy_world, out, **{"sample.prompts": "[]", "data.eval_path": "null"})
    align = shlex.join([sys.executable, str(ALIGN), *args])
    script = (f"mount -t tmpfs -o size={int(size_kb * 1.7)}k tmpfs {small} && {align}; echo rc=$?; "
              f"ls -a {out / 'checkpoints'}; cat {out / 'metrics.jsonl'}; {align}; echo rc=$?")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=align_env(), capture_output=True,
                          text=True, timeout=600)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower() and "Failed to load CPU" not in ln]
    assert proc.stdout.count("rc=2") == 2, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 2 and all(
        f"align: error: no space left on the disk holding {out / 'checkpoints'}" in ln
        and "checkpoint step-000004 was not written" in ln for ln in errors), errors
    listing = proc.stdout.split("rc=2", 1)[1]
    assert ".tmp-" not in listing and "step-000002" in listing and "step-000004" not in listing
    logged = [json.loads(line)["step"] for line in listing.splitlines() if line.startswith("{")]
    assert logged == [1, 2, 3, 4], "metrics.jsonl holds whole lines"


def test_a_different_recipe_in_the_same_run_dir_is_refused(reference_run, toy_world):
    out, _ = reference_run
    proc = _run(_args(toy_world, out, **{"method.beta": 500}))
    assert proc.returncode == 2
    assert "different recipe" in proc.stderr and "method.beta" in proc.stderr


def test_sweep_recipe_trains_each_point_and_skips_finished_ones(toy_world, tmp_path):
    args = _args(toy_world, tmp_path / "sweep", **{"trainer.max_steps": 2, "data.eval_path": "null",
                                                    "sample.prompts": "[]"})
    args[0] = "recipe=recipes/toy-sweep.yaml"
    proc = _run([*args, "sweep.lambdas=[1,4]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for lam, beta in (("1", 2000), ("4", 500)):
        run = tmp_path / "sweep" / f"lambda-{lam}"
        assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((run / "lora" / "lora_info.json").read_text())["beta"] == beta
    again = _run([*args, "sweep.lambdas=[1,4]"])
    assert again.returncode == 0 and again.stdout.count("finished already") == 2


def test_bad_recipe_fails_before_loading_anything(toy_world, tmp_path):
    proc = _run(_args(toy_world, tmp_path / "x", **{"trainer.lerning_rate": 1}))
    assert proc.returncode == 2 and "trainer.lerning_rate" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_csv_as_data_path_fails_before_loading_anything(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("caption,jpg_0,jpg_1,label_0\na red circle,x,y,1\n")
    args = ["recipe=recipes/toy-dpo.yaml", "data.source=parquet", f"data.path={csv}", "data.eval_path=null",
            f"trainer.output_dir={tmp_path / 'x'}"]
    proc = _run(args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.path file {str(csv)!r} is not a parquet file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_two_processes_match_one_process(reference_run, toy_world, tmp_path, launcher):
    """Same global batch (4): 1 process x 4 == 2 processes x 2, with DDP or DeepSpeed ZeRO-2, each
    image of a micro-batch backpropagated on its own (model.split_backward) against the batched run."""
    ref_out, _ = reference_run
    out = tmp_path / launcher
    # split_backward under both: per-image gradients carried into DDP's / DeepSpeed's one backward
    args = _args(toy_world, out, **{"trainer.per_device_batch_size": 2, "trainer.max_steps": 4,
                                    "data.eval_path": "null", "model.split_backward": "true"})
    port = str(29600 + (os.getpid() % 200) + (0 if launcher == "ddp" else 1))
    if launcher == "ddp":
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
        env = align_env(ACCELERATE_USE_CPU="1")
    else:
        pytest.importorskip("deepspeed")
        cmd = ["accelerate", "launch", "--config_file", "configs/accelerate/zero2.yaml", "--num_processes", "2",
               "--main_process_port", port]
        env = align_env(TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                       str(Path.home() / ".cache" / "torch_extensions")))
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), *cmd[1:], str(ALIGN), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 4 = 2 per device x 2 processes" in proc.stdout + proc.stderr
    single, multi = dpo_losses(ref_out), dpo_losses(out)
    for step in (1, 2, 3, 4):
        # Same pairs, noise and timesteps per step; only float reduction order differs.
        assert abs(single[step] - multi[step]) < 1e-4, (step, single[step], multi[step])
    if launcher == "zero2":
        # Checkpoints hold the LoRA, not the UNet; resuming from one continues the same curve.
        checkpoint = out / "checkpoints" / "step-000004"
        module_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*model_states.pt"))
        unet_bytes = sum(p.numel() * 4 for p in _toy_unet_params(toy_world))
        assert 0 < module_bytes < unet_bytes / 4, (module_bytes, unet_bytes)
        args = [a for a in args if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=6"]
        proc = subprocess.run([str(accelerate), *cmd[1:], str(ALIGN), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "resumed from" in proc.stdout + proc.stderr, proc.stderr[-4000:]
        resumed = dpo_losses(out)
        for step in (5, 6):
            assert abs(single[step] - resumed[step]) < 1e-4, (step, single[step], resumed[step])


def _toy_unet_params(toy_world):
    from diffusers import UNet2DConditionModel

    return list(UNet2DConditionModel.from_pretrained(str(toy_world / "pipe"), subfolder="unet").parameters())


def test_throughput_is_logged_per_step_and_totalled_in_the_summary(reference_run):
    out, proc = reference_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["perf/samples_per_s"] > 0 and row["perf/sec_per_step"] > 0
        assert 0 <= row["perf/data_wait_frac"] <= 1
        assert row["perf/peak_mem_mib"] > 100  # torch + a pipeline: far above 100 MiB of RSS
        assert row["perf/samples_per_s"] == pytest.approx(4 / row["perf/sec_per_step"])  # global batch 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["perf/steps_timed"] == 6 and 0 < summary["perf/train_s"] <= summary["wall_s"]
    assert 0 <= summary["perf/data_wait_s"] <= summary["perf/train_s"]
    assert summary["perf/peak_mem_mib"] >= max(r["perf/peak_mem_mib"] for r in rows)
    assert "samples/s=" in proc.stdout + proc.stderr  # in the progress bar


@pytest.mark.slow  # the batches themselves: tests/training/test_data.py (fast)
def test_loader_workers_give_the_same_losses_and_a_resume_may_change_their_number(reference_run, toy_world, tmp_path):
    """Steps 1-4 read by 2 DataLoader workers, 5-6 (resumed) in the training process: the losses
    of the reference run (default workers), bit for bit."""
    ref_out, _ = reference_run
    out = tmp_path / "workers"
    first = _run(_args(toy_world, out, **{"trainer.max_steps": 4, "data.num_workers": 2, "data.prefetch_factor": 3}))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = _run(_args(toy_world, out, **{"data.num_workers": 0}))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr, rest.stderr[-3000:]
    assert dpo_losses(out) == dpo_losses(ref_out)


@pytest.mark.slow
def test_streamed_data_read_ahead_resumes_identically(toy_world, tmp_path):
    """A streamed set read ahead by a thread (data.num_workers > 0), resumed across an epoch, gives
    the losses of reading it in the training loop."""
    over = {"data.streaming": "true", "trainer.max_steps": 7, "trainer.per_device_batch_size": 8,
            "trainer.checkpoint_every": 4, "trainer.log_every": 1, "sample.prompts": "[]", "data.eval_path": "null"}
    whole = _run(_args(toy_world, tmp_path / "whole", **{**over, "data.num_workers": 0}))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _run(_args(toy_world, tmp_path / "split", **{**over, "trainer.max_steps": 4, "data.num_workers": 2}))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = _run(_args(toy_world, tmp_path / "split", **{**over, "data.num_workers": 1}))
    assert rest.returncode == 0 and "resumed from" in rest.stdout + rest.stderr, rest.stderr[-3000:]
    assert dpo_losses(tmp_path / "split") == dpo_losses(tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["train/epoch"] == 1


def test_a_latent_cache_gives_the_uncached_losses_without_the_encoders(reference_run, toy_world, tmp_path):
    """`deradiff cache` then the same recipe with data.latent_cache: the reference run's losses and
    held-out metrics to float tolerance (the VAE ran on other batches), no VAE or text encoder
    kept, the sample grid still drawn."""
    ref_out, _ = reference_run
    cache, out = tmp_path / "cache", tmp_path / "cached"
    args = _args(toy_world, out, **{"data.latent_cache": cache})
    made = subprocess.run([sys.executable, "-m", "deradiff.cli", "cache", *args, "--num-workers", "0"], cwd=ROOT,
                          env=align_env(), capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    assert (cache / "manifest.json").exists() and "44 training pairs, 15 held-out" in made.stdout
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "44 from the latent cache" in log and "the VAE and text encoders are not kept" in log
    cached, uncached = dpo_losses(out), dpo_losses(ref_out)
    assert sorted(cached) == sorted(uncached)
    for step in cached:  # beta/2 = 1000 multiplies ~1e-7 differences of the errors
        assert abs(cached[step] - uncached[step]) < 1e-3, (step, cached[step], uncached[step])
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref_out))
    for key in ("eval/dpo/ref_mse", "eval/dpo/model_mse", "eval/dpo/implicit_acc", "data/kept", "data/ties"):
        assert summary[key] == pytest.approx(ref_summary[key], abs=1e-4), key
    assert (out / "samples" / "step-000006.png").exists()


@pytest.mark.slow
def test_the_step_breakdown_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/train_breakdown.py --tiny: the code the SD1.5-shape figures come from runs, and
    its table is consistent (steps = sums of parts, the cache removes the encoding)."""
    out = tmp_path / "breakdown.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_breakdown.py"), "--tiny", "--pairs", "2",
                           "--busy", "0.1", "--threads", "1", "--out", str(out)], cwd=ROOT, env=align_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    configs = result["results"]["configs"]
    assert {"uncached, 0 workers", "cached, 0 workers"} <= set(configs)  # + the default worker count, if > 0
    for name, c in configs.items():
        assert c["step"] == pytest.approx(c["data"] + c["encode"] + c["unet"] + c["optimizer"])
        assert 0 <= c["data_wait_frac"] <= 1 and (c["encode"] == 0) == name.startswith("cached")
    assert result["summary"]["cached_step_vs_uncached"] < 1
