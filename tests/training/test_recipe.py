"""Recipes: every shipped recipe loads and validates; overrides; every error type; resume checks."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest

from deradiff.errors import UserError
from deradiff.training.recipe import Recipe
from deradiff.training.recipe_checks import preflight, prompt_spec, validate, validation_errors
from deradiff.training.recipe_load import RECIPES_DIR, load_recipe, parse_cli, recipe_keys, shipped_recipes
from deradiff.training.recipe_runs import (
    RECIPE_FILE,
    check_resume,
    diff_recipes,
    load_resolved,
    recipe_to_yaml,
    save_resolved,
    sweep_recipes,
)

REQUIRED = {"toy-dpo", "toy-kl-grad", "toy-kl-pg", "toy-sweep", "toy-kl-sweep", "sd15-dpo-pickapic", "sdxl-dpo-pickapic", "sd15-kl-pickscore"}


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- shipped recipes ----------------------------------------------------------------------------


def test_the_required_recipes_are_shipped():
    assert REQUIRED <= {p.stem for p in shipped_recipes()}


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_validates_and_documents_its_launch(path):
    recipe = load_recipe(path)
    validate(recipe)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, "a recipe opens with comment lines: purpose and launch command"
    assert f"recipe=recipes/{path.name}" in "\n".join(header), "the header shows the exact launch command"
    if path.stem.startswith("toy"):
        assert recipe.model.name_or_path in ("toy", "toy-flow") and recipe.data.source == "parquet"
        assert recipe.data.resolution <= 64 and recipe.trainer.per_device_batch_size <= 32
    else:
        assert "/" in recipe.model.name_or_path  # a real hub id


def test_real_model_recipes_name_the_official_settings():
    sd15 = load_recipe(RECIPES_DIR / "sd15-dpo-pickapic.yaml")
    sdxl = load_recipe(RECIPES_DIR / "sdxl-dpo-pickapic.yaml")
    kl = load_recipe(RECIPES_DIR / "sd15-kl-pickscore.yaml")
    assert sd15.model.kind == "sd15" and sdxl.model.kind == "sdxl"
    assert sd15.data.path == sdxl.data.path == "yuvalkirstain/pickapic_v2"
    assert (sd15.method.beta, sdxl.method.beta) == (2000, 5000)
    assert sd15.method.beta_convention == sdxl.method.beta_convention == "official"
    for r in (sd15, sdxl):  # global batch 2048 on 8 GPUs, as the official launchers
        assert r.trainer.per_device_batch_size * 8 * r.trainer.gradient_accumulation == 2048
    assert kl.method.name == "kl_grad" and kl.method.reward == "pickscore" and kl.method.eta > 0


def test_sweep_recipe_covers_beta0_and_the_four_lambdas():
    recipe = load_recipe(RECIPES_DIR / "toy-sweep.yaml")
    points = sweep_recipes(recipe)
    assert sorted(lam for lam, _ in points) == [0.25, 0.5, 1.0, 2.0, 4.0]
    beta0 = recipe.method.beta
    for lam, r in points:
        assert r.method.beta == pytest.approx(beta0 / lam)
        assert r.trainer.output_dir == str(Path(recipe.trainer.output_dir) / f"lambda-{lam:g}")
        assert r.sweep.lambdas == [] and r.sweep.index is None
        validate(r)
    # Apart from the sweep and the run directory, toy-sweep is toy-dpo.
    toy_dpo = load_recipe(RECIPES_DIR / "toy-dpo.yaml")
    assert diff_recipes(toy_dpo, recipe, ignore=("sweep", "trainer.output_dir")) == []
    (lam, only), = sweep_recipes(load_recipe(RECIPES_DIR / "toy-sweep.yaml", ["sweep.index=3"]))
    assert lam == recipe.sweep.lambdas[3] and only.method.beta == pytest.approx(beta0 / lam)


def test_kl_sweep_recipe_spans_two_orders_of_magnitude_of_toy_kl_grad():
    recipe = load_recipe(RECIPES_DIR / "toy-kl-sweep.yaml")
    betas = sorted(r.method.beta for _, r in sweep_recipes(recipe))
    assert len(betas) == 4 and betas[-1] / betas[0] >= 100
    toy_kl = load_recipe(RECIPES_DIR / "toy-kl-grad.yaml")
    assert diff_recipes(toy_kl, recipe, ignore=("sweep", "trainer.output_dir")) == []


def test_every_option_is_documented_in_its_section():
    for section in dataclasses.fields(Recipe):
        cls = section.type if isinstance(section.type, type) else type(getattr(Recipe(), section.name))
        doc = cls.__doc__ or ""
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in doc, f"{section.name}.{f.name} lacks a line in {cls.__name__}'s docstring"
    assert {"trainer.lr", "method.beta", "data.path", "lora.rank", "sweep.lambdas"} <= set(recipe_keys())


# -- resolution order and overrides -------------------------------------------------------------


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "trainer:\n  lr: 3.0e-4\n  max_steps: 7\nmethod:\n  beta: 100\n")
    recipe = load_recipe(path, ["trainer.lr=1e-4", "lora.target_modules=[to_q, to_v]", "model.revision=abc"])
    assert recipe.trainer.lr == 1e-4  # the override wins over the file
    assert recipe.trainer.max_steps == 7  # the file wins over the default
    assert recipe.trainer.seed == Recipe().trainer.seed  # untouched default
    assert recipe.lora.target_modules == ["to_q", "to_v"]
    assert recipe.model.revision == "abc"
    # the command-line form
    same = load_recipe([f"recipe={path}", "trainer.lr=1e-4", "lora.target_modules=[to_q,to_v]", "model.revision=abc"])
    assert same == recipe
    assert load_recipe(path, ["model.revision=null"]).model.revision is None


def test_a_registered_model_fills_the_kind_and_prompt_length_it_was_trained_with(tmp_path):
    """toy-flow registers family sd3 and one T5 placeholder token: a recipe naming it needs neither;
    values the recipe gives win, and unregistered models keep the schema defaults."""
    recipe = load_recipe(None, ["model.name_or_path=toy-flow", "sample.scheduler=flow_euler", "method.beta=100"])
    assert (recipe.model.kind, recipe.model.max_sequence_length) == ("sd3", 1)
    given = load_recipe(None, ["model.name_or_path=toy-flow", "sample.scheduler=flow_euler", "method.beta=100",
                               "model.max_sequence_length=7"])
    assert given.model.max_sequence_length == 7
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text("model:\n  name_or_path: toy-flow\n  kind: sd15\n")
    assert load_recipe(yaml_file, ["method.beta=100"]).model.kind == "sd15"  # the file's kind is kept (and checked at load)
    toy = load_recipe(None, ["model.name_or_path=toy", "method.beta=100"])
    assert (toy.model.kind, toy.model.max_sequence_length) == ("sd15", None)
    folder = load_recipe(None, [f"model.name_or_path={tmp_path}", "method.beta=100"])
    assert (folder.model.kind, folder.model.max_sequence_length) == ("sd15", None)


def test_parse_cli_splits_recipe_from_overrides():
    assert parse_cli(["recipe=recipes/x.yaml", "trainer.lr=1e-4", "method.beta=2500"]) == (
        "recipes/x.yaml", ["trainer.lr=1e-4", "method.beta=2500"])
    assert parse_cli(["sample.prompts=[a=b]"]) == (None, ["sample.prompts=[a=b]"])  # split at the first =
    assert parse_cli([]) == (None, [])


def test_bare_recipe_name_and_unquoted_no(tmp_path):
    assert load_recipe("toy-dpo") == load_recipe(RECIPES_DIR / "toy-dpo.yaml")
    path = _write(tmp_path, "model:\n  mixed_precision: no\nmethod:\n  beta: 1\n")  # YAML reads `no` as false
    assert load_recipe(path).model.mixed_precision == "no"
    assert load_recipe(None, ["model.mixed_precision=no", "method.beta=1"]).model.mixed_precision == "no"


def test_yaml_round_trip_and_atomic_resolved_save(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "toy-kl-pg.yaml", ["trainer.lr=5e-5"])
    assert load_recipe(_write(tmp_path, recipe_to_yaml(recipe))) == recipe
    run = tmp_path / "run"
    saved = save_resolved(recipe, run)
    assert saved == run / RECIPE_FILE and saved.read_text().startswith("#")
    assert [p.name for p in run.iterdir()] == [RECIPE_FILE]  # no temp file left behind
    assert load_resolved(run) == recipe
    assert load_resolved(tmp_path / "nowhere") is None


# -- errors -------------------------------------------------------------------------------------


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'trainer.lrr'.*did you mean 'trainer.lr'"):
        load_recipe(None, ["trainer.lrr=1e-4", "method.beta=1"])
    with pytest.raises(UserError, match=r"unknown key 'lr'.*did you mean 'trainer.lr'"):
        load_recipe(None, ["lr=1e-4", "method.beta=1"])
    path = _write(tmp_path, "method:\n  beta: 1\n  bta_convention: official\n")
    with pytest.raises(UserError, match=rf"unknown key 'method.bta_convention' \(in {path}\).*'method.beta_convention'"):
        load_recipe(path)
    with pytest.raises(UserError, match="valid sections"):
        load_recipe(None, ["zzzz.qqqq=1"])


def test_wrong_types_and_choices_name_key_and_expectation():
    with pytest.raises(UserError, match=r"trainer.lr: expected a number, got 'fast'"):
        load_recipe(None, ["trainer.lr=fast", "method.beta=1"])
    with pytest.raises(UserError, match=r"trainer.max_steps: expected an integer, got 1.5"):
        load_recipe(None, ["trainer.max_steps=1.5", "method.beta=1"])
    with pytest.raises(UserError, match=r"method.name: expected one of 'dpo', 'kl_grad', 'kl_pg', got 'dop'.*did you mean 'dpo'"):
        load_recipe(None, ["method.name=dop", "method.beta=1"])
    with pytest.raises(UserError, match=r"data.random_flip: expected true or false"):
        load_recipe(None, ["data.random_flip=maybe", "method.beta=1"])
    with pytest.raises(UserError, match=r"lora.target_modules: expected a list of strings"):
        load_recipe(None, ["lora.target_modules=to_q", "method.beta=1"])
    with pytest.raises(UserError, match=r"trainer is a section"):
        load_recipe(None, ["trainer=3", "method.beta=1"])


def test_all_problems_are_reported_at_once(tmp_path):
    path = _write(tmp_path, "trainer:\n  lrr: 1\n  max_steps: many\n")
    with pytest.raises(UserError) as err:
        load_recipe(path, ["model.kind=sd4", "method.beta=1"])
    msg = str(err.value)
    assert "3 problems" in msg and "trainer.lrr" in msg and "trainer.max_steps" in msg and "model.kind" in msg
    with pytest.raises(UserError) as err:
        load_recipe(None, ["method.beta=-1", "trainer.warmup_steps=1000", "lora.dropout=1.5", "trainer.checkpoint_every=0"])
    msg = str(err.value)
    assert "4 problems" in msg
    for key in ("method.beta", "trainer.warmup_steps", "lora.dropout", "trainer.checkpoint_every"):
        assert key in msg


def test_out_of_range_and_cross_field_checks():
    def problems(*overrides: str) -> list[str]:
        try:
            load_recipe(None, ["method.beta=1", *overrides])
        except UserError as err:
            return str(err).splitlines()
        return []

    assert problems() == []
    assert validation_errors(load_recipe(None, ["method.beta=1"])) == []
    with pytest.raises(UserError, match="method.beta is required"):
        load_recipe(None, [])
    assert any("method.eta must be in (0, 1]" in p for p in problems("method.name=kl_grad", "data.prompts=toy:train", "method.eta=0"))
    assert any("method.truncation_steps" in p for p in problems("method.name=kl_grad", "data.prompts=toy:train", "method.truncation_steps=30"))
    assert any("multiple of" in p for p in problems("method.name=kl_pg", "data.prompts=toy:train", "trainer.per_device_batch_size=6"))
    assert any("data.resolution" in p for p in problems("data.resolution=30"))
    assert any("sweep.lambdas" in p for p in problems("sweep.lambdas=[1,0]"))
    assert any("sweep.index" in p for p in problems("sweep.lambdas=[1,2]", "sweep.index=2"))
    # method-specific checks do not fire for the other methods
    assert problems("method.eta=0", "method.truncation_steps=99") == []


@pytest.mark.parametrize("method", ["dpo", "kl_grad", "kl_pg"])
@pytest.mark.parametrize("override, match", [
    ("method.num_steps=0", "method.num_steps (sampling steps) must be >= 1, got 0"),
    ("method.num_steps=-3", "method.num_steps (sampling steps) must be >= 1, got -3"),
    ("method.guidance_scale=-2", "method.guidance_scale must be a number >= "),
    ("sample.num_inference_steps=0", "sample.num_inference_steps must be >= 1, got 0"),
    ("sample.guidance_scale=-1", "sample.guidance_scale must be a number >= 0, got -1.0"),
    ("sample.guidance_scale=.nan", "sample.guidance_scale must be a number >= 0"),
])
def test_sampling_steps_and_guidance_are_refused_for_every_method(method, override, match):
    """Every recipe number of sampling steps or guidance scale is checked, whatever the method."""
    base = ["method.beta=1", f"method.name={method}", "data.prompts=toy:train"]
    with pytest.raises(UserError) as err:
        load_recipe(None, [*base, override])
    assert match in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["trainer.lr"], "expected key=value"),
        (["--trainer.lr=1e-4"], "without dashes, e.g. trainer.lr=1e-4"),
        (["trainer..lr=1"], "malformed key"),
        (["=3"], "malformed key"),
        (["recipe=a.yaml", "recipe=b.yaml"], "given twice"),
        (["recipe="], "recipe= is empty"),
    ],
)
def test_malformed_command_line_items(argv, match):
    with pytest.raises(UserError, match=match):
        parse_cli(argv)
    with pytest.raises(UserError, match=match):
        load_recipe(argv)


def test_missing_or_unreadable_recipe_files(tmp_path):
    with pytest.raises(UserError, match=r"recipe file 'nope.yaml' not found; shipped recipes .*toy-dpo"):
        load_recipe("nope.yaml")
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path)
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "trainer: [unclosed\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(UserError, match="pass the recipe file as the source"):
        load_recipe(None, ["recipe=x.yaml"])


@pytest.mark.parametrize("text, line, first, key", [
    ("method:\n  beta: 1\n  name: dpo\ntrainer:\n  lr: 1.0e-4\nmethod:\n  beta: 3\n", 6, 1, "method"),
    ("method:\n  beta: 1\n  name: dpo\n  beta: 3\n", 4, 2, "method.beta"),
    ("sample:\n  prompts: [a]\n  seed: 1\n\n  seed: 2\n", 5, 3, "sample.seed"),
])
def test_a_duplicated_key_is_reported_with_its_line(tmp_path, text, line, first, key):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"line {line}: duplicate key {key!r} (first at line {first})" in message, message
    assert "\n" not in message


# -- resume and preflight -----------------------------------------------------------------------


def test_diff_and_resume_refuse_a_different_recipe(tmp_path):
    base = load_recipe(RECIPES_DIR / "toy-dpo.yaml")
    assert diff_recipes(base, base) == []
    changed = load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["trainer.lr=1e-3", "method.beta=500"])
    assert diff_recipes(base, changed) == ["method.beta: 2000.0 -> 500.0", "trainer.lr: 0.0002 -> 0.001"]
    assert diff_recipes(base, changed, ignore=("method",)) == ["trainer.lr: 0.0002 -> 0.001"]

    run = tmp_path / "run"
    assert check_resume(base, run) == []  # a new run directory
    save_resolved(base, run)
    assert check_resume(base, run) == []
    longer = load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["trainer.max_steps=900", "sample.guidance_scale=5"])
    assert check_resume(longer, run) == []  # resume-safe keys may change
    with pytest.raises(UserError, match=r"different recipe.*trainer.lr: 0.0002 -> 0.001.*trainer.resume=force"):
        check_resume(changed, run)
    forced = load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["trainer.lr=1e-3", "method.beta=500", "trainer.resume=force"])
    assert len(check_resume(forced, run)) == 2


def _pairs_parquet(path: Path, columns=("caption", "jpg_0", "jpg_1", "label_0", "label_1")) -> Path:
    """A one-row parquet file with these columns (preflight reads only the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = {"caption": "a red circle", "jpg_0": b"x", "jpg_1": b"y", "label_0": 1.0, "label_1": 0.0}
    pq.write_table(pa.table({c: [values.get(c, "v")] for c in columns}), path)
    return path


@pytest.mark.parametrize("key", ["data.path", "data.eval_path"])
def test_preflight_refuses_a_csv_or_a_parquet_without_the_pair_columns(tmp_path, key):
    good = _pairs_parquet(tmp_path / "good.parquet")
    csv = tmp_path / "pairs.csv"
    csv.write_text("caption,jpg_0,jpg_1,label_0\na red circle,x,y,1\n")
    paths = {"data.path": str(good), "data.eval_path": str(good)}
    base = ["data.source=parquet", *(f"{k}={v}" for k, v in paths.items() if k != key)]
    with pytest.raises(UserError) as err:
        preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", [*base, f"{key}={csv}"]))
    message = str(err.value)
    assert f"{key} file {str(csv)!r} is not a parquet file" in message and "\n" not in message
    assert "magic bytes" in message.lower() or "parquet" in message
    no_labels = _pairs_parquet(tmp_path / "no-labels.parquet", columns=("caption", "jpg_0", "jpg_1"))
    with pytest.raises(UserError, match=rf"{key} file .*no-labels.parquet' lacks the Pick-a-Pic column\(s\) label_0"):
        preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", [*base, f"{key}={no_labels}"]))
    folder = tmp_path / "folder"
    folder.mkdir()
    _pairs_parquet(folder / "a.parquet")
    (folder / "b.parquet").write_text("caption,jpg_0\n")  # a CSV under a parquet name, inside a folder
    with pytest.raises(UserError, match=r"b.parquet' is not a parquet file"):
        preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", [*base, f"{key}={folder}"]))


def test_sampling_methods_train_on_data_prompts_or_the_models_default_set(tmp_path):
    recipe = load_recipe(None, ["method.beta=1", "method.name=kl_pg"])  # model "toy": its registered default
    assert prompt_spec(recipe) == "toy:train"
    prompts = _write(tmp_path, "a red circle\n", "prompts.txt")
    assert prompt_spec(load_recipe(None, ["method.beta=1", "method.name=kl_pg", f"data.prompts={prompts}"])) == str(prompts)
    unregistered = load_recipe(None, ["method.beta=1", "method.name=kl_grad", f"model.name_or_path={tmp_path}"])
    with pytest.raises(UserError, match=r"registers no default set: set data.prompts"):
        preflight(unregistered)


def test_data_source_toy_is_read_as_parquet_so_old_run_recipes_resume(tmp_path):
    old = _write(tmp_path, "data:\n  source: toy\nmethod:\n  beta: 1\n", "old.yaml")
    assert load_recipe(old).data.source == "parquet"
    run = tmp_path / "run"
    run.mkdir()
    (run / RECIPE_FILE).write_text(recipe_to_yaml(load_recipe(None, ["method.beta=1"])).replace(
        "source: parquet", "source: toy"))
    assert check_resume(load_recipe(None, ["method.beta=1"]), run) == []
    assert load_recipe(None, ["method.beta=1", "data.streaming=true"]).data.streaming  # parquet streams


def test_preflight_prints_the_recipe_warnings(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    recipe = load_recipe(RECIPES_DIR / "sdxl-dpo-pickapic.yaml", ["model.vae_name_or_path=null",
                                                                   "model.mixed_precision=fp16"])
    with contextlib.suppress(UserError):  # fp16 without CUDA fails; the warning is printed first
        preflight(recipe)
    err = capsys.readouterr().err
    assert "warning: SDXL in fp16 with its own VAE can overflow to NaN" in err
    assert "model.vae_name_or_path=madebyollin/sdxl-vae-fp16-fix" in err
    preflight(load_recipe(RECIPES_DIR / "sdxl-dpo-pickapic.yaml"))  # shipped: the fp16-safe VAE, bf16
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other launched processes stay quiet
    with contextlib.suppress(UserError):
        preflight(recipe)
    assert "warning" not in capsys.readouterr().err


def test_preflight_names_missing_files_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPES_DIR / "toy-dpo.yaml")
    with pytest.raises(UserError, match=r"data.path 'runs/toy-prefs/train.parquet' matches no parquet file \(make the toy preference pairs with `deradiff toy make-prefs`\)"):
        preflight(recipe)
    (tmp_path / "runs" / "toy-prefs").mkdir(parents=True)
    for name in ("train", "test"):
        _pairs_parquet(tmp_path / "runs" / "toy-prefs" / f"{name}.parquet")
    preflight(recipe)
    with pytest.raises(UserError, match="sample.scheduler 'dddim'"):
        preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["sample.scheduler=dddim"]))
    with pytest.raises(UserError, match=r"method.reward: unknown reward 'nope'"):
        preflight(load_recipe(RECIPES_DIR / "toy-kl-grad.yaml", ["method.reward=nope"]))
    with pytest.raises(UserError, match="data.prompts 'missing.txt' is not a file"):
        preflight(load_recipe(RECIPES_DIR / "toy-kl-pg.yaml", ["data.prompts=missing.txt"]))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match="pip install bitsandbytes"):
            preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["trainer.optimizer=adamw8bit"]))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16 needs a CUDA device"):
            preflight(load_recipe(RECIPES_DIR / "toy-dpo.yaml", ["model.mixed_precision=fp16"]))
    assert os.getcwd() == str(tmp_path)


def test_split_backward_is_refused_where_it_cannot_hold():
    assert load_recipe(None, ["method.beta=2000", "model.split_backward=true"]).model.split_backward
    with pytest.raises(UserError, match="model.split_backward applies to dpo.*set model.split_backward=false"):
        load_recipe(None, ["method.beta=1", "method.name=kl_grad", "model.split_backward=true"])
    with pytest.raises(UserError, match="model.split_backward=true with model.mixed_precision=fp16.*use bf16"):
        load_recipe(None, ["method.beta=2000", "model.split_backward=true", "model.mixed_precision=fp16"])


# -- --help ---------------------------------------------------------------------------------------


def test_every_recipe_key_is_described_once_in_its_section_docstring():
    from deradiff.training.recipe_help import key_descriptions

    described = key_descriptions()
    assert set(described) == set(recipe_keys()), set(recipe_keys()) ^ set(described)
    assert all(len(text) > 5 for text in described.values())


def test_help_lists_every_key_with_its_default_and_explains_one_in_full():
    from deradiff.training.recipe_help import recipe_help

    listing = recipe_help().splitlines()
    assert [ln.split()[0] for ln in listing if not ln.startswith("   ")] == recipe_keys()  # long keys wrap
    assert any(line.split()[:3] == ["model.split_backward", "=", "false"] for line in listing)
    assert any(line.split()[:3] == ["lora.target_modules", "=", "[to_q,"] for line in listing)
    one = recipe_help("model.split_backward")
    assert one.startswith("model.split_backward: true or false, default false\n") and "ZeRO-3" in one
    section = recipe_help("sample")
    assert [ln.split(":")[0] for ln in section.splitlines() if ln.startswith("sample.")] == [
        k for k in recipe_keys() if k.startswith("sample.")]
    with pytest.raises(UserError, match=r"--help model.splt: no such recipe key or section: did you mean "
                                        r"'model.split_backward'"):
        recipe_help("model.splt")


def test_align_help_prints_the_keys_and_a_topic(tmp_path):
    import subprocess
    import sys

    align = [sys.executable, str(Path(__file__).resolve().parents[2] / "train" / "align.py")]
    listing = subprocess.run([*align, "--help"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "model.split_backward = false" in listing.stdout
    topic = subprocess.run([*align, "--help", "trainer.lr"], capture_output=True, text=True, timeout=120)
    assert topic.returncode == 0 and topic.stdout.startswith("trainer.lr: a number, default 0.0001")
    bad = subprocess.run([*align, "--help", "trainer.lrr"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "did you mean 'trainer.lr'" in bad.stderr
