"""slurm/*.sbatch and `deradiff slurm submit`, on a real SLURM 22.05 cluster started on this host
(scripts/slurm_cluster.sh: 2 emulated nodes), plus fast checks of the submit helper.

The cluster tests are marked slow; they need root and apt (or the slurm packages installed) and
are skipped, with the reason, where the cluster cannot start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from align_runs import dpo_losses

from deradiff import slurm
from deradiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# -- fast: the submit helper's checks, no cluster ----------------------------------------------


@pytest.mark.parametrize("spec, seconds", [("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-0", 86400),
                                           ("1-2:03", 93780), ("1-02:03:04", 93784)])
def test_time_limit_seconds(spec, seconds):
    assert slurm.time_limit_seconds(spec) == seconds


@pytest.mark.parametrize("spec", ["", "1h", "1:2:3:4", "-5", "1-"])
def test_time_limit_rejects_malformed(spec):
    with pytest.raises(UserError, match="not a SLURM time"):
        slurm.time_limit_seconds(spec)


@pytest.mark.parametrize("indices, limit, spec", [([0, 1, 2], None, "0-2"), ([0, 2, 3, 4, 7], None, "0,2-4,7"),
                                                  ([5], 2, "5%2")])
def test_array_spec(indices, limit, spec):
    assert slurm.array_spec(indices, limit) == spec


def _pairs_parquet(path: Path) -> None:
    """A one-row parquet with the Pick-a-Pic columns (preflight reads only the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a red circle"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}), path)


@pytest.fixture
def fake_data(tmp_path):
    """Files the toy recipes' preflight accepts (parquet files with the Pick-a-Pic columns)."""
    for name in ("train.parquet", "test.parquet"):
        _pairs_parquet(tmp_path / name)
    return [f"data.path={tmp_path / 'train.parquet'}", f"data.eval_path={tmp_path / 'test.parquet'}"]


def test_a_csv_as_data_path_fails_the_dry_run(recording_sbatch, fake_data, tmp_path, capsys):
    """The same pre-flight as train/align.py: a CSV would otherwise queue for hours, then fail."""
    csv = tmp_path / "pairs.csv"
    csv.write_text("caption,jpg_0,jpg_1,label_0\na red circle,x,y,1\n")
    rc = _submit("align", "--dry-run", "--recipe", str(ROOT / "recipes/toy-dpo.yaml"), *fake_data,
                 f"data.path={csv}", f"trainer.output_dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert rc == 2
    assert f"data.path file {str(csv)!r} is not a parquet file" in err
    assert "Traceback" not in err and "sbatch" not in err
    assert not recording_sbatch.exists()


@pytest.fixture
def recording_sbatch(tmp_path, monkeypatch):
    """A fake `sbatch` on PATH that records its calls and answers job id 4242."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch-calls.txt"
    (bindir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return calls


def _submit(*argv: str) -> int:
    from deradiff.cli import main

    return main(["slurm", "submit", *argv])


def test_align_submission_checks_then_calls_sbatch(recording_sbatch, fake_data, tmp_path, capsys):
    rc = _submit("align", "--nodes", "2", "--global-batch", "16", "--partition", "gpu", "--account", "proj",
                 "--time", "2:00:00", "--recipe", str(ROOT / "recipes/toy-dpo.yaml"), *fake_data,
                 f"trainer.output_dir={tmp_path / 'run'}")
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip() == "4242"  # the job id alone on stdout
    call = recording_sbatch.read_text()
    for part in ("--nodes=2", "--ntasks-per-node=1", "--partition=gpu", "--account=proj", "--time=2:00:00",
                 "--signal=B:USR1@600", "--requeue", "slurm/align.sbatch",
                 f"recipe={ROOT / 'recipes/toy-dpo.yaml'}", "trainer.per_device_batch_size=8"):
        assert part in call, (part, call)


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "recipes/toy-dpo.yaml", "method.bta=3"], "did you mean 'method.beta'"),
    (["--recipe", "recipes/toy-dpo.yaml", "trainer.lr=7"], "trainer.lr must be in"),
    (["--nodes", "3", "--global-batch", "16", "--recipe", "recipes/toy-dpo.yaml"], "does not split over 3 node"),
    (["--accelerate-config", "nope.yaml", "--recipe", "recipes/toy-dpo.yaml"], "accelerate config 'nope.yaml' not found"),
    (["--time", "5", "--recipe", "recipes/toy-dpo.yaml"], "not below the time limit"),
    (["--global-batch", "0", "--recipe", "recipes/toy-dpo.yaml"], "--global-batch must be >= 1, got 0"),
    (["--global-batch", "-8", "--recipe", "recipes/toy-dpo.yaml"], "--global-batch must be >= 1, got -8"),
])
def test_align_bad_input_fails_before_sbatch(recording_sbatch, fake_data, capsys, argv, message):
    argv = [a.replace("recipes/", str(ROOT / "recipes") + "/") for a in argv]
    start = time.perf_counter()
    rc = _submit("align", *argv, *fake_data)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert "per_device_batch_size" not in err, "the error names an internal field, not the flag typed"
    assert not recording_sbatch.exists(), "sbatch was called for a bad submission"
    assert time.perf_counter() - start < 60


def test_deepspeed_config_checks(recording_sbatch, fake_data, capsys, monkeypatch):
    argv = ["align", "--nodes", "2", "--accelerate-config", "configs/accelerate/zero2.yaml", "--dry-run",
            "--recipe", str(ROOT / "recipes/toy-dpo.yaml"), *fake_data]
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert _submit(*argv) == 2  # its configs/deepspeed/zero2.json is relative: not found from tmp_path
    assert "submit from the repository root" in capsys.readouterr().err
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert _submit(*argv) == 2
    assert "silently drops DeepSpeed" in capsys.readouterr().err
    assert not recording_sbatch.exists()


def test_search_submission_is_shards_then_a_dependent_merge(recording_sbatch, tmp_path, capsys):
    pytest.importorskip("deradiff.evaluation.evaluate", reason="`deradiff evaluate` is not in this installation")
    rc = _submit("search", "--shards", "3", "--out", str(tmp_path / "eval"), "--evaluate-args",
                 "--lora runs/x --prompts 'a red circle on a dark background' --lam 0 1", "--search-args", "--grid 0 1")
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.split() == ["4242", "4242"]
    shard, merge = recording_sbatch.read_text().splitlines()
    assert "--array=0-2 " in shard and "--dependency" not in shard
    assert shard.endswith("search.sbatch shard --lora runs/x --prompts a red circle on a dark background --lam 0 1")
    assert "--dependency=afterok:4242 " in merge and merge.endswith("search.sbatch merge --grid 0 1")


@pytest.mark.parametrize("flag, value", [("--evaluate-args", "--lamb 0 1"), ("--search-args", "--refine many")])
def test_search_bad_arguments_fail_before_sbatch(recording_sbatch, tmp_path, capsys, flag, value):
    pytest.importorskip("deradiff.evaluation.evaluate", reason="`deradiff evaluate` is not in this installation")
    assert _submit("search", "--out", str(tmp_path / "eval"), flag, value) == 2
    assert "do not parse" in capsys.readouterr().err
    assert not recording_sbatch.exists()


def _sweep_argv(tmp_path, fake_data, *extra):
    return ["sweep", "--recipe", str(ROOT / "recipes/toy-sweep.yaml"), *fake_data, "sweep.lambdas=[0.5,1,2]",
            f"trainer.output_dir={tmp_path / 'sweep'}", "trainer.max_steps=3", "trainer.warmup_steps=0", *extra]


def _finish(point_dir: Path, steps: int) -> None:
    (point_dir / "lora").mkdir(parents=True)
    (point_dir / slurm.LORA_FILE).write_bytes(b"")
    (point_dir / slurm.SUMMARY_FILE).write_text(json.dumps({"step": steps}))


def test_sweep_submits_only_unfinished_points(recording_sbatch, fake_data, tmp_path, capsys):
    from deradiff.training.recipe_load import load_recipe
    from deradiff.training.recipe_runs import save_resolved, sweep_recipes

    argv = _sweep_argv(tmp_path, fake_data)
    points = sweep_recipes(load_recipe(argv[2], argv[3:]))
    save_resolved(points[1][1], points[1][1].trainer.output_dir)
    _finish(Path(points[1][1].trainer.output_dir), steps=3)
    assert _submit(*argv) == 0, capsys.readouterr().err
    assert "--array=0,2 " in recording_sbatch.read_text()
    for _, point in points:
        save_resolved(point, point.trainer.output_dir)
        if not (Path(point.trainer.output_dir) / "lora").exists():
            _finish(Path(point.trainer.output_dir), steps=3)
    recording_sbatch.unlink()
    capsys.readouterr()
    assert _submit(*argv) == 0
    out = capsys.readouterr()
    assert "all 3 points are finished" in out.err and out.out == ""
    assert not recording_sbatch.exists()


def test_sweep_refuses_run_dir_of_a_different_recipe(recording_sbatch, fake_data, tmp_path, capsys):
    from deradiff.training.recipe_load import load_recipe
    from deradiff.training.recipe_runs import save_resolved, sweep_recipes

    argv = _sweep_argv(tmp_path, fake_data)
    _, point = sweep_recipes(load_recipe(argv[2], argv[3:]))[2]
    point.trainer.lr = 3e-4  # the run already in lambda-2 was trained with another learning rate
    save_resolved(point, point.trainer.output_dir)
    assert _submit(*argv) == 2
    err = capsys.readouterr().err
    assert "lambda-2 holds a run of a different recipe" in err and "trainer.lr" in err
    assert not recording_sbatch.exists()


def test_sweep_needs_lambdas(recording_sbatch, fake_data, capsys):
    assert _submit("sweep", "--recipe", str(ROOT / "recipes/toy-dpo.yaml"), *fake_data) == 2
    assert "sweep.lambdas is empty" in capsys.readouterr().err


def test_finished_entry_point(fake_data, tmp_path):
    argv = _sweep_argv(tmp_path, fake_data)[1:]
    argv[0:2] = [f"recipe={argv[1]}"]

    def finished(index: int) -> int:
        return subprocess.run([sys.executable, "-m", "deradiff.slurm", "finished", *argv, f"sweep.index={index}"],
                              capture_output=True, text=True).returncode

    _finish(tmp_path / "sweep" / "lambda-2", steps=3)
    _finish(tmp_path / "sweep" / "lambda-1", steps=2)  # stopped early: trainer.max_steps is 3
    assert [finished(i) for i in range(3)] == [1, 1, 0]


# -- slow: a real cluster -----------------------------------------------------------------------


def _sh(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Environment for sbatch & co. on a local 2-node cluster; torn down if this fixture started it."""
    base = {**os.environ, "DERADIFF_SLURM_DIR": os.environ.get("DERADIFF_SLURM_DIR", "/tmp/deradiff-slurm")}
    was_up = _sh(["bash", str(CLUSTER_SCRIPT), "status"], base).returncode == 0
    start = time.perf_counter()
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], env=base, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        reason = f"local SLURM cluster did not start (rc {up.returncode}): {up.stderr.strip().splitlines()[-1:]}"
        print(reason, file=sys.stderr)
        if up.returncode == 3:  # cannot run here: not root, no apt
            pytest.skip(reason)
        pytest.fail(reason)
    print(f"local SLURM cluster up in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    conf = re.search(r"SLURM_CONF=(\S+)", up.stdout).group(1)
    bindir = str(Path(sys.executable).parent)
    env = {**base, "SLURM_CONF": conf, "PATH": f"{bindir}{os.pathsep}{base['PATH']}", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    yield env
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=base, capture_output=True, timeout=120)


def _job_states(job: str, env: dict) -> list[dict[str, str]]:
    """One dict of scontrol fields per job (array tasks each have one)."""
    out = _sh(["scontrol", "show", "job", "-o", job], env).stdout
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line.strip()]


def _wait(job: str, env: dict, timeout: float = 300, on_poll=None) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _job_states(job, env)
        if on_poll is not None:
            on_poll(states)
        if states and all(s.get("JobState") in TERMINAL for s in states):
            return states
        time.sleep(0.5)
    pytest.fail(f"job {job} not finished after {timeout} s: {[s.get('JobState') for s in _job_states(job, env)]}")


def _logs(log_dir: Path, pattern: str = "*") -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(log_dir.glob(pattern)))


def _train_overrides(toy_world: Path, out: Path, **over) -> list[str]:
    base = {
        "model.name_or_path": toy_world / "pipe",
        "data.source": "parquet",
        "data.path": toy_world / "prefs" / "train.parquet",
        "data.eval_path": "null",
        "trainer.output_dir": out,
        "trainer.max_steps": 14,
        "trainer.per_device_batch_size": 2,
        "trainer.warmup_steps": 0,
        "trainer.log_every": 1,
        "trainer.checkpoint_every": 100,
        "trainer.eval_every": 0,
        "trainer.sample_every": 0,
    }
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _helper(env: dict, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deradiff.cli", "slurm", "submit", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# How each preempted run is interrupted once it has logged 3 steps.
PREEMPTIONS = {
    # SLURM's time-limit warning, as `#SBATCH --signal=B:USR1@secs` sends it: align.sbatch passes it
    # to the trainers, which checkpoint and stop; the script requeues the job.
    "warned": ["scancel", "--batch", "--signal=USR1"],
    # The scheduler (or an admin) requeues the job: SIGTERM to every process, SIGKILL after KillWait.
    "requeued": ["scontrol", "requeue"],
}


@pytest.fixture(scope="module")
def jobs(cluster, toy_world, tmp_path_factory):
    """Submit every training job at once through `deradiff slurm submit` (they run side by side on
    the 2 nodes); each test waits on its own."""
    work = tmp_path_factory.mktemp("slurm")
    logs = work / "logs"
    common = ["--time", "20", "--log-dir", str(logs)]
    argv = {}
    for name in ("reference", *PREEMPTIONS):  # the same 2-node run, uninterrupted or preempted mid-run
        argv[name] = ["align", "--nodes", "2", *common, "--job-name", f"align-{name}",
                      "--recipe", str(ROOT / "recipes/toy-dpo.yaml"), *_train_overrides(toy_world, work / name)]
    argv["sweep"] = ["sweep", *common, "--recipe", str(ROOT / "recipes/toy-sweep.yaml"),
                     *_train_overrides(toy_world, work / "sweep", **{"trainer.max_steps": 3}), "sweep.lambdas=[0.5,1,2]"]
    helpers = {name: subprocess.Popen([sys.executable, "-m", "deradiff.cli", "slurm", "submit", *a], cwd=work,
                                      env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, a in argv.items()}
    ids = {}
    for name, proc in helpers.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        ids[name] = out.strip()
    return {"work": work, "logs": logs, "ids": ids, "sweep_argv": argv["sweep"]}


@pytest.mark.slow
def test_cluster_runs_a_two_node_step(cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1\n"
                      "srun bash -c 'echo node=$SLURM_NODEID host=$SLURMD_NODENAME'\n")
    proc = _sh(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", str(script)], cluster, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (state,) = _wait(proc.stdout.strip(), cluster, timeout=180)
    assert state["JobState"] == "COMPLETED"
    lines = sorted(next(tmp_path.glob("*.out")).read_text().split())
    assert lines == ["host=dd1", "host=dd2", "node=0", "node=1"]


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes_identically(cluster, jobs):
    """Interrupted mid-run both ways, each job checkpoints, is requeued, resumes, and logs exactly
    the losses of the uninterrupted reference run."""
    ids = {name: jobs["ids"][name] for name in PREEMPTIONS}
    to_signal, pending_since, final = set(PREEMPTIONS), {}, {}
    deadline = time.monotonic() + 900
    while len(final) < len(ids):
        assert time.monotonic() < deadline, _logs(jobs["logs"], "align-*")
        for name in sorted(to_signal):
            run = jobs["work"] / name
            if (run / "metrics.jsonl").exists() and len(dpo_losses(run)) >= 3:
                assert _sh([*PREEMPTIONS[name], ids[name]], cluster).returncode == 0
                to_signal.discard(name)
        for name, job in ids.items():
            (state,) = _job_states(job, cluster)
            if state["JobState"] in TERMINAL and name not in to_signal:
                final[name] = state
            elif state["JobState"] == "PENDING" and int(state.get("Restarts", 0)) > 0:
                # A requeued job waits 2 minutes (BeginTime) before it may start again; shorten that
                # to a few seconds (sooner, slurmd may still hold the revoked credential of its first run).
                if time.monotonic() - pending_since.setdefault(name, time.monotonic()) > 5:
                    _sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], cluster)
        time.sleep(0.3)

    (ref_state,) = _wait(jobs["ids"]["reference"], cluster, timeout=600)
    assert ref_state["JobState"] == "COMPLETED", _logs(jobs["logs"], "align-reference*")
    reference = dpo_losses(jobs["work"] / "reference")
    for name, state in final.items():
        logs = _logs(jobs["logs"], f"align-{name}*")
        assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) == 1, logs
        # Each node's first process prints these lines.
        stopped = {int(s) for s in re.findall(r"checkpoint at step (\d+) saved", logs)}
        resumed = {int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)}
        assert len(stopped) == 1 and stopped == resumed, logs
        assert 0 < min(stopped) < 14, logs  # really stopped mid-run
        assert ("requeueing; the next start resumes" in logs) == (name == "warned"), logs
        losses = dpo_losses(jobs["work"] / name)
        assert sorted(losses) == list(range(1, 15))
        assert losses == reference, name  # bit-identical losses after the resume


@pytest.mark.slow
def test_align_on_two_nodes(cluster, jobs, toy_world):
    job, run = jobs["ids"]["reference"], jobs["work"] / "reference"
    (state,) = _wait(job, cluster, timeout=600)
    logs = _logs(jobs["logs"], "align-reference*")
    assert state["JobState"] == "COMPLETED", logs
    assert state["NodeList"] == "dd[1-2]"
    # Both ranks took part: one global batch spans 2 processes, and each rank saved its RNG state.
    assert "x 2 processes" in logs
    assert {p.name for p in (run / "checkpoints" / "step-000014").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    for node in (0, 1):
        assert (jobs["logs"] / f"align-reference-{job}-node{node}.out").exists()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_world / "pipe"))
    pipe.load_lora_weights(str(run / "lora"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.slow
def test_sweep_array_trains_each_point_and_skips_finished_ones(cluster, jobs):
    job = jobs["ids"]["sweep"]
    states = _wait(job, cluster, timeout=600)
    logs = _logs(jobs["logs"], "deradiff-sweep*")
    assert sorted(s["ArrayTaskId"] for s in states) == ["0", "1", "2"]
    assert all(s["JobState"] == "COMPLETED" for s in states), logs
    for lam, beta in (("0.5", 4000.0), ("1", 2000.0), ("2", 1000.0)):
        run = jobs["work"] / "sweep" / f"lambda-{lam}"
        assert (run / slurm.LORA_FILE).is_file() and (run / slurm.SUMMARY_FILE).is_file(), logs
        assert f"beta: {beta}" in (run / "recipe.yaml").read_text()
    again = _helper(cluster, jobs["work"], *jobs["sweep_argv"])
    assert again.returncode == 0 and again.stdout.strip() == "", again.stderr
    assert "all 3 points are finished" in again.stderr


STUB = '''#!{python}
"""Stand-in for `deradiff evaluate/search/report`: records what the search jobs asked for."""
import json, os, sys, time
from pathlib import Path

cmd, args = sys.argv[1], sys.argv[2:]
out = Path(args[args.index("--out" if "--out" in args else "--eval") + 1])
out.mkdir(parents=True, exist_ok=True)
record = {{"args": args, "node": os.environ.get("SLURMD_NODENAME"), "time": time.time()}}
if cmd == "evaluate" and "--shard" in args:
    i, n = args[args.index("--shard") + 1].split("/")
    if i == os.environ.get("FAIL_SHARD"):
        sys.exit(1)
    time.sleep(1)
    (out / f"shard-{{i}}-of-{{n}}.json").write_text(json.dumps(record))
elif cmd == "evaluate" and "--merge" in args:
    shards = sorted(out.glob("shard-*.json"))
    record["shards"] = [json.loads(p.read_text()) for p in shards]
    (out / "merged.json").write_text(json.dumps(record))
else:
    (out / f"{{cmd}}.json").write_text(json.dumps(record))
'''
EVAL_ARGS = ["--prompts", "a red circle, on a dark background", "--lam", "0", "1"]
SEARCH_ARGS = ["--grid", "0", "1", "--maximize", "reward/toy"]


def _submit_search(cluster, tmp_path, out: Path, **env) -> tuple[str, str]:
    """The two sbatch lines of slurm/search.sbatch's header, with a stand-in `deradiff`."""
    stub = tmp_path / "deradiff-stub"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {**cluster, "DERADIFF": str(stub), "SEARCH_DIR": str(out), "REPORT_ARGS": "--n-boot 50", **env}
    script, logs = str(ROOT / "slurm" / "search.sbatch"), tmp_path / "logs"
    common = ["sbatch", "--parsable", "--time=5", f"--output={logs}/%x-%A_%a.out"]
    logs.mkdir()
    shards = _sh([*common, "--array=0-1", script, "shard", *EVAL_ARGS], env, cwd=tmp_path)
    assert shards.returncode == 0, shards.stderr
    merge = _sh([*common, f"--dependency=afterok:{shards.stdout.strip()}", script, "merge", *SEARCH_ARGS], env,
                cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    return shards.stdout.strip(), merge.stdout.strip()


@pytest.mark.slow
def test_search_shards_then_merge_after_all_succeed(cluster, tmp_path):
    """The sbatch plumbing of the sharded search (array + afterok merge), with a stand-in
    `deradiff` that records its arguments."""
    out = tmp_path / "search"
    shard_job, merge_job = _submit_search(cluster, tmp_path, out)
    assert all(s["JobState"] == "COMPLETED" for s in _wait(shard_job, cluster, timeout=300)), _logs(tmp_path / "logs")
    (merge_state,) = _wait(merge_job, cluster, timeout=300)
    assert merge_state["JobState"] == "COMPLETED", _logs(tmp_path / "logs")
    merged = json.loads((out / "merged.json").read_text())
    assert [s["args"] for s in merged["shards"]] == [
        ["--out", str(out), *EVAL_ARGS, "--shard", f"{i}/2"] for i in range(2)]  # the prompt's spaces survive
    assert merged["time"] >= max(s["time"] for s in merged["shards"])  # ran after both shards
    assert json.loads((out / "search.json").read_text())["args"] == ["--out", str(out), *SEARCH_ARGS]
    assert json.loads((out / "report.json").read_text())["args"] == ["--eval", str(out), "--n-boot", "50"]


@pytest.mark.slow
def test_search_merge_never_runs_after_a_failed_shard(cluster, tmp_path):
    out = tmp_path / "search"
    shard_job, merge_job = _submit_search(cluster, tmp_path, out, FAIL_SHARD="1")
    states = {s["ArrayTaskId"]: s["JobState"] for s in _wait(shard_job, cluster, timeout=300)}
    assert states == {"0": "COMPLETED", "1": "FAILED"}
    deadline = time.monotonic() + 30
    while (reason := _job_states(merge_job, cluster)[0].get("Reason")) != "DependencyNeverSatisfied":
        assert time.monotonic() < deadline, reason
        time.sleep(0.5)
    _sh(["scancel", merge_job], cluster)
    assert not (out / "merged.json").exists()


@pytest.mark.slow
def test_search_of_the_trained_lora_through_the_helper(cluster, jobs, toy_world):
    """`deradiff slurm submit search` on the LoRA the 2-node job trained: 2 evaluate shards, then
    merge + search + report, with the real commands."""
    pytest.importorskip("deradiff.evaluation.evaluate", reason="`deradiff evaluate` is not in this installation")
    (state,) = _wait(jobs["ids"]["reference"], cluster, timeout=600)
    assert state["JobState"] == "COMPLETED", _logs(jobs["logs"], "align-reference*")
    out, logs = jobs["work"] / "eval", jobs["work"] / "search-logs"
    evaluate = (f"--lora {jobs['work'] / 'reference'} --pipeline {toy_world / 'pipe'} --prompts toy:test "
                "--max-prompts 2 --seeds 0 1 --steps 2 --lam 0 1 --reward toy --fidelity none")
    proc = _helper(cluster, jobs["work"], "search", "--shards", "2", "--time", "20", "--log-dir", str(logs),
                   "--out", str(out), "--evaluate-args", evaluate,
                   "--search-args", "--grid 0 1 --maximize reward/toy --refine 1 --n-boot 50",
                   "--report-args", "--n-boot 50")
    assert proc.returncode == 0, proc.stderr
    shard_job, merge_job = proc.stdout.split()
    assert all(s["JobState"] == "COMPLETED" for s in _wait(shard_job, cluster, timeout=600)), _logs(logs)
    (merge_state,) = _wait(merge_job, cluster, timeout=600)
    assert merge_state["JobState"] == "COMPLETED", _logs(logs)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "0-of-2.jsonl", "0-of-2.sampling.json", "1-of-2.jsonl", "1-of-2.sampling.json"]  # rows, throughput
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["prompt_id"], r["seed"]) for r in rows if r["lam"] in (0, 0.0, "0")} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    search = json.loads((out / "search.json").read_text())
    assert 0 <= search["chosen_lambda"] <= 1
    assert (out / "report" / "report.md").is_file()
