"""Submit training, the beta sweep and the lambda search to SLURM, after checking them here.

    deradiff slurm submit align --nodes 2 --gpus-per-node 8 --partition gpu --account proj \
        --time 24:00:00 --recipe recipes/sd15-dpo-pickapic.yaml trainer.output_dir=runs/sd15-dpo
    deradiff slurm submit sweep --gpus-per-node 1 --time 2:00:00 --recipe recipes/toy-sweep.yaml
    deradiff slurm submit search --shards 8 --out runs/eval --gpus-per-node 1 \
        --evaluate-args "--lora runs/toy-dpo --prompts toy:test --lam 0 0.5 1 2 4" \
        --search-args "--grid 0 0.5 1 2 4 --maximize reward/toy"

Everything a job would fail on after hours in the queue fails here in seconds: the recipe is
loaded, validated and preflighted (data files open as parquet with the Pick-a-Pic columns, prompt
files, optional packages; recipe warnings printed), the batch split over
nodes x processes is checked, the accelerate config must exist, and a run directory holding a
different recipe is refused. The scripts submitted are slurm/align.sbatch, slurm/sweep.sbatch
and slurm/search.sbatch (see them for what runs on the nodes); job ids are printed.

Also used by slurm/sweep.sbatch on the node (Python reads recipes; bash never does):
    python -m deradiff.slurm finished recipe=R [key=value ...] sweep.index=I
exits 0 when that sweep point (or run) is already finished, 1 when it still has to train.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from deradiff.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: train/, slurm/, configs/
SCRIPTS = {"align": "align.sbatch", "sweep": "sweep.sbatch", "search": "search.sbatch"}
LORA_FILE = "lora/pytorch_lora_weights.safetensors"
SUMMARY_FILE = "summary.json"
# Accepted --time forms (sbatch's): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


# -- checks -------------------------------------------------------------------------------------


def time_limit_seconds(spec: str) -> int:
    """sbatch --time string -> seconds; UserError for a malformed one."""
    m = _TIME.match(spec.strip())
    if not m:
        raise UserError(f"--time {spec!r} is not a SLURM time: use minutes, H:M:S or D-H:M:S (e.g. 24:00:00)")
    if m.group(1) is not None:  # D-H[:M[:S]]
        d, h, mi, s = (int(g or 0) for g in m.group(1, 2, 3, 4))
        return ((d * 24 + h) * 60 + mi) * 60 + s
    parts = [int(g) for g in m.group(5, 6, 7) if g is not None]
    if len(parts) == 1:
        return parts[0] * 60  # minutes
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # M:S
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def processes_per_node(args: argparse.Namespace) -> int:
    """Training processes per node: --processes-per-node, else one per GPU, else 1."""
    return args.processes_per_node or args.gpus_per_node or 1


def batch_overrides(recipe, nodes: int, procs_per_node: int, global_batch: int | None) -> list[str]:
    """Check the batch split over nodes x processes; return the override that realizes it.

    global batch = per_device_batch_size x (nodes x processes per node) x gradient_accumulation.
    With `global_batch` given, per_device_batch_size is derived from it and must be a whole number.
    """
    t = recipe.trainer
    world = nodes * procs_per_node
    if global_batch is None:
        return []
    per_step = world * t.gradient_accumulation
    if global_batch % per_step:
        raise UserError(
            f"--global-batch {global_batch} does not split over {nodes} node(s) x {procs_per_node} process(es) x "
            f"{t.gradient_accumulation} accumulation step(s) = {per_step}: choose a multiple of {per_step}, or "
            f"nodes, processes and trainer.gradient_accumulation whose product divides {global_batch}"
        )
    return [f"trainer.per_device_batch_size={global_batch // per_step}"]


def default_accelerate_config(nodes: int, procs_per_node: int) -> Path:
    """The config slurm/common.sh picks by size: single (1 process), multi_gpu (1 node), multi_node."""
    if nodes * procs_per_node == 1:
        name = "single.yaml"
    elif nodes == 1:
        name = "multi_gpu.yaml"
    else:
        name = "multi_node.yaml"
    return ROOT / "configs" / "accelerate" / name


def check_accelerate_config(path: str | None, nodes: int, procs_per_node: int) -> Path:
    """Resolve --accelerate-config (relative to the current folder or the checkout) and check it."""
    if path is None:
        config = default_accelerate_config(nodes, procs_per_node)
    else:
        candidates = [Path(path), ROOT / path, ROOT / "configs" / "accelerate" / path]
        config = next((c for c in candidates if c.is_file()), Path(path))
    if not config.is_file():
        shipped = ", ".join(sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")))
        raise UserError(f"accelerate config {str(config)!r} not found; pass --accelerate-config, e.g. one of "
                        f"configs/accelerate/: {shipped or 'none found'}")
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(config))
    if cfg.get("distributed_type") == "DEEPSPEED":
        ds = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds and not Path(ds).is_file():  # accelerate resolves it against the job's folder, the submit folder
            raise UserError(f"accelerate config {config} names DeepSpeed config {ds!r}, which is not found from "
                            f"{Path.cwd()} where the job will run: submit from the repository root")
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise UserError(f"ACCELERATE_USE_CPU is set in this environment, which silently drops DeepSpeed "
                            f"({config.name}); unset it or use a non-DeepSpeed config")
    return config.resolve()


def run_finished(recipe) -> bool:
    """True when the run directory holds the final LoRA and a summary at trainer.max_steps."""
    from deradiff.training.trainer import is_finished

    return is_finished(Path(recipe.trainer.output_dir), recipe.trainer.max_steps)


def load_checked(recipe_path: str, overrides: list[str]):
    """Load, validate and preflight a recipe (the checks align.py makes before loading models)."""
    from deradiff.training.recipe_checks import preflight
    from deradiff.training.recipe_load import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    preflight(recipe)
    return recipe


def sweep_points(recipe) -> list[tuple[int, float, object]]:
    """(array index, lambda, point recipe) for every sweep point; refuses foreign run directories."""
    from deradiff.training.recipe_runs import check_resume, sweep_recipes

    if not recipe.sweep.lambdas:
        raise UserError("the recipe has no sweep (sweep.lambdas is empty): use `deradiff slurm submit align`, "
                        "or set sweep.lambdas, e.g. sweep.lambdas=[0.25,0.5,1,2,4]")
    if recipe.sweep.index is not None:
        raise UserError("sweep.index is set: the array submits every point itself; remove sweep.index")
    points = []
    for index, (lam, point) in enumerate(sweep_recipes(recipe)):
        check_resume(point, point.trainer.output_dir)  # raises for a different recipe in that directory
        points.append((index, lam, point))
    return points


def array_spec(indices: list[int], max_parallel: int | None) -> str:
    """SLURM --array value for these task indices, e.g. "0,2-4%2"."""
    runs: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(runs) + (f"%{max_parallel}" if max_parallel else "")


# -- sbatch -------------------------------------------------------------------------------------


def sbatch_command(args: argparse.Namespace, script: str, *, array: str | None = None, name: str,
                   signal: bool = True, extra: list[str] = ()) -> list[str]:
    """The sbatch command line for one submission (options from the flags, then the script)."""
    log = Path(args.log_dir) / ("%x-%A_%a.out" if array else "%x-%j.out")
    cmd = ["sbatch", "--parsable", f"--job-name={args.job_name or name}", f"--output={log}",
           f"--time={args.time}"]
    for flag, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                        ("cpus-per-task", args.cpus_per_task), ("mem", args.mem)):
        if value:
            cmd.append(f"--{flag}={value}")
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    if array is not None:
        cmd.append(f"--array={array}")
    if signal:
        cmd.append(f"--signal=B:USR1@{args.signal_seconds}")
    cmd += [*extra, *args.sbatch_arg, str(ROOT / "slurm" / script)]
    return cmd


def submit(cmd: list[str], env: dict[str, str], dry_run: bool) -> str:
    """Run sbatch (or only print it with --dry-run); return the job id."""
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd)
    print(f"$ {shown}", file=sys.stderr)
    if dry_run:
        return "DRY-RUN"
    if shutil.which(cmd[0]) is None:
        raise UserError("sbatch not found: run this on a SLURM login node (or use --dry-run to see the command)")
    log_dir = next(Path(a.split("=", 1)[1]).parent for a in cmd if a.startswith("--output="))
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create it; a job without it fails silently
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def _launch_env(args: argparse.Namespace, config: Path) -> dict[str, str]:
    return {"ACCELERATE_CONFIG": str(config), "PROCS_PER_NODE": str(processes_per_node(args)),
            "DERADIFF_ROOT": str(ROOT), "LOG_DIR": args.log_dir}


def _check_common(args: argparse.Namespace) -> None:
    if not (ROOT / "train" / "align.py").is_file() or not (ROOT / "slurm").is_dir():
        raise UserError(f"{ROOT} is not a deradiff source checkout (train/align.py, slurm/): install with pip -e")
    if args.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0 or (args.processes_per_node is not None and args.processes_per_node < 1):
        raise UserError("--gpus-per-node must be >= 0 and --processes-per-node >= 1")
    for flag, value in (("--global-batch", args.global_batch), ("--max-parallel", args.max_parallel)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}: give a positive number or leave the flag out")
    limit = time_limit_seconds(args.time)
    if args.signal_seconds >= limit:
        raise UserError(f"--signal-seconds {args.signal_seconds} is not below the time limit ({limit} s): the "
                        f"checkpoint warning would come at once; lower it or raise --time")


def submit_training(args: argparse.Namespace, kind: str) -> list[str]:
    """align: one job; sweep: one array task per unfinished sweep point. Returns the job ids."""
    if not args.recipe:
        raise UserError(f"--recipe is required for {kind}, e.g. --recipe recipes/toy-{'sweep' if kind == 'sweep' else 'dpo'}.yaml")
    recipe_path, overrides = args.recipe[0], list(args.recipe[1:])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"--recipe takes one file then key=value overrides; {bad[0]!r} is not key=value")
    recipe = load_checked(recipe_path, overrides)
    procs = processes_per_node(args)
    overrides += batch_overrides(recipe, args.nodes, procs, args.global_batch)
    if args.global_batch is not None:
        recipe = load_checked(recipe_path, overrides)  # re-validate with the derived batch size
    config = check_accelerate_config(args.accelerate_config, args.nodes, procs)
    train_args = [f"recipe={recipe_path}", *overrides]
    extra = [f"--nodes={args.nodes}", "--ntasks-per-node=1", "--requeue", "--open-mode=append"]
    env = _launch_env(args, config)
    world = args.nodes * procs
    batch = recipe.trainer.per_device_batch_size * world * recipe.trainer.gradient_accumulation
    if kind == "align":
        from deradiff.training.recipe_runs import check_resume

        if recipe.sweep.lambdas:
            print("note: the recipe has a sweep; `align` trains it in one job, one point after another "
                  "(`deradiff slurm submit sweep` runs the points in parallel)", file=sys.stderr)
        check_resume(recipe, recipe.trainer.output_dir)
        job = submit(sbatch_command(args, SCRIPTS["align"], name="deradiff-align", extra=extra) + train_args,
                     env, args.dry_run)
        print(f"align: job {job}: {args.nodes} node(s) x {procs} process(es), global batch {batch}, "
              f"run dir {recipe.trainer.output_dir}, logs {args.log_dir}/", file=sys.stderr)
        print(job)
        return [job]
    points = sweep_points(recipe)
    todo = [i for i, _, point in points if not run_finished(point)]
    for i, lam, point in points:
        state = "to train" if i in todo else "finished, skipped"
        print(f"  [{i}] lambda {lam:g} beta {point.method.beta:g} -> {point.trainer.output_dir}: {state}", file=sys.stderr)
    if not todo:
        print(f"sweep: all {len(points)} points are finished; nothing submitted", file=sys.stderr)
        return []
    array = array_spec(todo, args.max_parallel)
    job = submit(sbatch_command(args, SCRIPTS["sweep"], array=array, name="deradiff-sweep", extra=extra) + train_args,
                 env, args.dry_run)
    print(f"sweep: array job {job} (tasks {array}) of {len(points)} points, each {args.nodes} node(s) x {procs} "
          f"process(es), global batch {batch}, logs {args.log_dir}/", file=sys.stderr)
    print(job)
    return [job]


def _check_arguments(module: str, argv: list[str]) -> None:
    """Parse `deradiff <module>` arguments with that command's own parser (typos fail here)."""
    import importlib

    from deradiff.cli import COMMANDS

    try:
        mod = importlib.import_module(COMMANDS[module][0])
    except (KeyError, ImportError):
        raise UserError(f"`deradiff {module}` is not available in this installation") from None
    parser = argparse.ArgumentParser(prog=f"deradiff {module}", exit_on_error=False)
    mod.add_arguments(parser)
    try:
        parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as err:
        raise UserError(f"deradiff {module} arguments {shlex.join(argv)!r} do not parse: {err}") from None


def submit_search(args: argparse.Namespace) -> list[str]:
    """Array over prompt shards + a merge/search/report job after all shards succeed."""
    if args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    if not args.out:
        raise UserError("--out is required for search: the evaluation folder the shards share, e.g. --out runs/eval")
    evaluate_args, search_args = shlex.split(args.evaluate_args), shlex.split(args.search_args)
    _check_arguments("evaluate", ["--out", args.out, *evaluate_args, "--shard", f"0/{args.shards}"])
    _check_arguments("search", ["--out", args.out, *search_args])
    _check_arguments("report", ["--eval", args.out, *shlex.split(args.report_args)])
    env = {"SEARCH_DIR": args.out, "SEARCH_SHARDS": str(args.shards), "REPORT_ARGS": args.report_args}
    extra = ["--nodes=1", "--ntasks=1", "--requeue", "--open-mode=append"]
    shard_job = submit(sbatch_command(args, SCRIPTS["search"], array=array_spec(list(range(args.shards)), args.max_parallel),
                                      name="deradiff-search", signal=False, extra=extra) + ["shard", *evaluate_args],
                       env, args.dry_run)
    merge_job = submit(sbatch_command(args, SCRIPTS["search"], name="deradiff-search-merge", signal=False,
                                      extra=[*extra, f"--dependency=afterok:{shard_job}"]) + ["merge", *search_args],
                       env, args.dry_run)
    print(f"search: shards job {shard_job} ({args.shards} tasks), merge job {merge_job} (after all shards succeed), "
          f"results {args.out}", file=sys.stderr)
    print(f"{shard_job} {merge_job}")
    return [shard_job, merge_job]


# -- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(SCRIPTS), help="align: one training run on --nodes nodes; sweep: "
                        "one array task per sweep.lambdas point; search: evaluate shards + merge/search/report")
    parser.add_argument("--recipe", nargs="+", metavar=("PATH", "key=value"),
                        help="align, sweep: the recipe file and any key=value overrides, as train/align.py takes "
                        "them, e.g. --recipe recipes/toy-dpo.yaml trainer.max_steps=100")
    g = parser.add_argument_group("resources (sbatch options)")
    g.add_argument("--partition", help="SLURM partition; default: the cluster's default partition")
    g.add_argument("--account", help="SLURM account to charge")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--nodes", type=int, default=1, help="nodes per training run (align, and each sweep task)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: none requested, e.g. CPU tests)")
    g.add_argument("--processes-per-node", type=int, default=None,
                   help="training processes per node; default: one per GPU, or 1 without GPUs")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node-launcher task (data loading threads)")
    g.add_argument("--mem", help="memory per node, e.g. 200G; default: the partition's")
    g.add_argument("--time", default="24:00:00", help="time limit of each job (D-HH:MM:SS)")
    g.add_argument("--signal-seconds", type=int, default=600,
                   help="seconds before the time limit at which training checkpoints and requeues; must cover one "
                   "step plus one checkpoint (SLURM may send it up to 60 s early)")
    g.add_argument("--max-parallel", type=int, default=None, help="at most this many array tasks at once (sweep, search)")
    g.add_argument("--job-name", help="job name; default deradiff-<kind>")
    g.add_argument("--log-dir", default="logs/slurm", help="job logs: <log-dir>/<job name>-<job id>[_<task>].out")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, repeatable, e.g. --sbatch-arg=--exclusive --sbatch-arg=--constraint=a100")
    t = parser.add_argument_group("training (align, sweep)")
    t.add_argument("--accelerate-config",
                   help="accelerate config (configs/accelerate/*.yaml: zero2.yaml, zero3.yaml for DeepSpeed); "
                   "default: single.yaml for 1 process, multi_gpu.yaml for 1 node, multi_node.yaml otherwise")
    t.add_argument("--global-batch", type=int, default=None,
                   help="derive trainer.per_device_batch_size = global batch / (nodes x processes x accumulation); "
                   "refused when it does not divide")
    s = parser.add_argument_group("search")
    s.add_argument("--shards", type=int, default=4, help="prompt shards = array tasks of the evaluation")
    s.add_argument("--out", help="evaluation folder shared by the shards, the search and the report")
    s.add_argument("--evaluate-args", default="", help="arguments of each shard's `deradiff evaluate` (one string, "
                   "split like a shell; write --evaluate-args=\"...\" when it starts with a dash), e.g. \"--lora runs/toy-dpo --prompts toy:test --lam 0 0.5 1 2 4\"")
    s.add_argument("--search-args", default="", help="arguments of `deradiff search` in the merge job, e.g. "
                   "\"--grid 0 0.5 1 2 4 --maximize reward/toy\"")
    s.add_argument("--report-args", default="", help="extra arguments of `deradiff report` in the merge job")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the sbatch commands only")


def run(args: argparse.Namespace) -> int:
    _check_common(args)
    if args.kind == "search":
        submit_search(args)
    else:
        submit_training(args, args.kind)
    return 0


def _finished_main(argv: list[str]) -> int:
    """`python -m deradiff.slurm finished <align.py arguments>`: 0 if that run/point is finished."""
    from deradiff.training.recipe_load import load_recipe
    from deradiff.training.recipe_runs import sweep_recipes

    try:
        recipe = load_recipe(argv)
        target = sweep_recipes(recipe)[0][1] if recipe.sweep.lambdas and recipe.sweep.index is not None else recipe
    except UserError as err:
        print(f"deradiff.slurm finished: error: {err}", file=sys.stderr)
        return 2
    done = run_finished(target)
    print(f"{target.trainer.output_dir}: {'finished, skipping' if done else 'to train'}", file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    if sys.argv[1:2] != ["finished"]:
        sys.exit("usage: python -m deradiff.slurm finished recipe=PATH [key=value ...]")
    sys.exit(_finished_main(sys.argv[2:]))
