"""Training SD3- and FLUX-shaped flow-matching transformers (tests/tiny_flow.py) on the shared trainer.

The family table calls each transformer exactly as its stock pipeline does; train/align.py runs
flow Diffusion-DPO end to end; the trained LoRA reloads through stock `load_lora_weights`; a
resumed run and 2-process runs (DDP, DeepSpeed ZeRO-2 and ZeRO-3) reproduce the uninterrupted
single-process losses and LoRA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align_runs import align_env, dpo_losses  # noqa: E402
from tiny_flow import MAX_SEQUENCE_LENGTH, TRANSFORMER_LORA_TARGETS, build_tiny_flux, build_tiny_sd3  # noqa: E402

from deradiff.training.conditioning import encode_prompts  # noqa: E402
from deradiff.training.families import FAMILIES, family_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALIGN = ROOT / "train" / "align.py"
PROMPT = "a red circle on a blue background"

pytestmark = pytest.mark.usefixtures("one_thread")


def _captured_call(pipe, **call):
    """Run one denoising step of the stock pipeline; return the latents (B, C, h, w), the
    transformer's keyword arguments and its output, as the pipeline made them."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="latent",
             max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    return seen["kwargs"], seen["output"]


def test_sd3_predict_is_the_pipelines_transformer_call(tmp_path):
    pipe = build_tiny_sd3(tmp_path)
    kwargs, output = _captured_call(pipe, guidance_scale=4.5)  # CFG: rows [uncond; cond]
    uncond, cond = (encode_prompts(pipe, [p], "cpu", max_sequence_length=MAX_SEQUENCE_LENGTH) for p in ("", PROMPT))
    both = uncond.cat(cond)  # encoded one by one, as the pipeline does
    with torch.no_grad():
        ours = FAMILIES["sd3"].predict(pipe.transformer, kwargs["hidden_states"], kwargs["timestep"], both)
    torch.testing.assert_close(ours, output, rtol=0, atol=0)


def test_flux_predict_packs_latents_and_takes_the_guidance_as_an_input(tmp_path):
    from diffusers import FluxPipeline

    pipe = build_tiny_flux(tmp_path, guidance_embeds=True)
    kwargs, output = _captured_call(pipe, guidance_scale=3.5)
    assert kwargs["hidden_states"].shape == (1, 64, 64)  # 16x16 latents as 8x8 patches of 2x2x16
    x = FluxPipeline._unpack_latents(kwargs["hidden_states"], 16, 16, vae_scale_factor=1)
    cond = encode_prompts(pipe, [PROMPT], "cpu", guidance=3.5, max_sequence_length=MAX_SEQUENCE_LENGTH)
    with torch.no_grad():  # the pipeline hands the transformer t / 1000; predict takes t
        ours = FAMILIES["flux"].predict(pipe.transformer, x, kwargs["timestep"] * 1000, cond)
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(output, 16, 16, vae_scale_factor=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="guidance"):
        encode_prompts(pipe, [PROMPT], "cpu")


def test_family_of_names_each_pipeline_and_a_wrong_kind_is_one_line(tmp_path, tiny_sd15, tiny_sdxl):
    from deradiff.errors import UserError
    from deradiff.training.families import check_family

    sd3 = build_tiny_sd3(tmp_path)
    assert [family_of(p) for p in (tiny_sd15[1], tiny_sdxl[1], sd3)] == ["sd15", "sdxl", "sd3"]
    with pytest.raises(UserError, match="model.kind=sd15 but the pipeline is a StableDiffusion3Pipeline .sd3.: "
                                        "set model.kind=sd3"):
        check_family("sd15", sd3)


# -- train/align.py on a saved tiny SD3 pipeline ------------------------------------------------------


def _args(pipe_dir: Path, prefs: Path, out: Path, **over) -> list[str]:
    base = {
        "model.name_or_path": str(pipe_dir), "model.kind": "sd3", "model.max_sequence_length": MAX_SEQUENCE_LENGTH,
        "lora.rank": 2, "lora.alpha": 4, "lora.target_modules": "[" + ",".join(TRANSFORMER_LORA_TARGETS) + "]",
        "data.source": "parquet", "data.path": str(prefs), "data.eval_path": "null",
        "method.beta": 100, "trainer.output_dir": str(out), "trainer.max_steps": 4, "trainer.per_device_batch_size": 4,
        "trainer.warmup_steps": 0, "trainer.lr": 1e-3, "trainer.log_every": 1, "trainer.checkpoint_every": 2,
        "sample.prompts": "[]",
    }
    base.update(over)
    return ["recipe=recipes/toy-dpo.yaml", *(f"{k}={v}" for k, v in base.items())]


def _run(args, launcher: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ALIGN), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or align_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory, toy_world):
    root = tmp_path_factory.mktemp("flow_dpo")
    build_tiny_sd3(root / "tok").save_pretrained(root / "pipe")
    return root / "pipe", toy_world / "prefs" / "train.parquet"


@pytest.fixture(scope="module")
def sd3_run(sd3_world, tmp_path_factory):
    """4 steps of flow DPO, one process, global batch 4, checkpoints at steps 2 and 4."""
    pipe_dir, prefs = sd3_world
    out = tmp_path_factory.mktemp("sd3_run") / "run"
    proc = _run(_args(pipe_dir, prefs, out))
    return out, proc


def test_flow_dpo_trains_and_stock_load_lora_weights_restores_the_transformer(sd3_world, sd3_run, tmp_path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from deradiff.models import add_lora

    pipe_dir, _ = sd3_world
    out, proc = sd3_run
    log = proc.stdout + proc.stderr
    assert "beta=100 (official convention" in log and "sigma index logit-normal(0, 1)" in log
    assert sorted(dpo_losses(out)) == [1, 2, 3, 4]
    # The trained transformer, rebuilt from the trainer's own checkpoint (peft keys) ...
    trained = build_tiny_sd3(tmp_path / "a").transformer
    add_lora(trained, rank=2, alpha=4, target_modules=TRANSFORMER_LORA_TARGETS)
    set_peft_model_state_dict(trained, load_file(out / "checkpoints" / "step-000004" / "lora.safetensors"))
    # ... and a fresh stock pipeline reading the saved LoRA (rank, alpha and targets from its header).
    stock = build_tiny_sd3(tmp_path / "b")
    base = build_tiny_sd3(tmp_path / "c").transformer
    stock.load_lora_weights(str(out / "lora"))
    adapted = {n.split(".lora_A")[0] for n, _ in stock.transformer.named_parameters() if ".lora_A" in n}
    assert all(any(name.endswith("." + target) for name in adapted) for target in TRANSFORMER_LORA_TARGETS)
    gen = torch.Generator().manual_seed(0)
    x, ehs, pooled = torch.randn(2, 16, 16, 16, generator=gen), torch.randn(2, 5, 64, generator=gen), \
        torch.randn(2, 64, generator=gen)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        outs = [m(hidden_states=x, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled,
                  return_dict=False)[0] for m in (trained, stock.transformer, base)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert (outs[1] - outs[2]).abs().max() > 1e-4  # the LoRA moved away from the base


@pytest.mark.slow
def test_flow_dpo_resumes_bit_identically(sd3_world, sd3_run, tmp_path):
    pipe_dir, prefs = sd3_world
    ref_out, _ = sd3_run
    out = tmp_path / "split"
    _run(_args(pipe_dir, prefs, out, **{"trainer.max_steps": 2}))
    rest = _run(_args(pipe_dir, prefs, out))
    assert "resumed from" in rest.stdout + rest.stderr
    assert dpo_losses(out) == dpo_losses(ref_out)
    assert len(set(dpo_losses(out).values())) > 1  # the LoRA moved: later steps differ from log 2


# The processes of each launcher: DDP over gloo, or DeepSpeed through the project's accelerate configs.
_LAUNCHERS = {"ddp": ["--multi_gpu"], "zero2": ["--config_file", "configs/accelerate/zero2.yaml"],
              "zero3": ["--config_file", "configs/accelerate/zero3.yaml"]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("launcher", "first_steps"), [("ddp", 4), ("zero2", 4), ("zero3", 2)])
def test_flow_dpo_two_processes_match_one_process(sd3_world, sd3_run, tmp_path, launcher, first_steps):
    """Global batch 4: 1 process x 4 pairs == 2 processes x 2 pairs, step by step, with DDP (gloo),
    DeepSpeed ZeRO-2 or ZeRO-3. ZeRO-3 shards even the tiny model's weights (persistence threshold
    0), stops at step 2 and resumes from its sharded checkpoint to step 4. The final LoRA is the
    1-process one; DeepSpeed's checkpoints hold the LoRA, not the transformer."""
    pipe_dir, prefs = sd3_world
    ref_out, _ = sd3_run
    out = tmp_path / launcher
    port = str(29800 + os.getpid() % 150 + 150 * list(_LAUNCHERS).index(launcher))
    options = [*_LAUNCHERS[launcher], "--num_processes", "2", "--main_process_port", port]
    env = align_env(ACCELERATE_USE_CPU="1")
    if launcher != "ddp":
        pytest.importorskip("deepspeed")
        env = align_env(TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                           str(Path.home() / ".cache" / "torch_extensions")))
    if launcher == "zero3":  # the default threshold (1e5 elements) would keep every tiny tensor whole
        config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "zero3.json").write_text(json.dumps(config))
        options += ["--deepspeed_config_file", str(tmp_path / "zero3.json")]
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", *options]

    def args(steps: int) -> list[str]:
        return _args(pipe_dir, prefs, out, **{"trainer.per_device_batch_size": 2, "trainer.max_steps": steps})

    proc = _run(args(first_steps), launcher=accelerate, env=env)
    assert "global batch 4 = 2 per device x 2 processes" in proc.stdout + proc.stderr
    if first_steps < 4:
        rest = _run(args(4), launcher=accelerate, env=env)
        assert f"resumed from {out / 'checkpoints' / f'step-{first_steps:06d}'}" in rest.stdout + rest.stderr
    single, multi = dpo_losses(ref_out), dpo_losses(out)
    assert sorted(multi) == [1, 2, 3, 4]
    tolerance = 1e-5 if launcher == "ddp" else 1e-4  # measured: at most 6e-6 with every launcher
    for step in (1, 2, 3, 4):  # same pairs, noise and sigmas per step; only float reduction order differs
        assert abs(single[step] - multi[step]) < tolerance, (step, single[step], multi[step])
    _assert_lora_matches(out / "lora", ref_out / "lora", tmp_path)
    if launcher != "ddp":
        _assert_checkpoint_is_lora_only(out / "checkpoints" / "step-000004", pipe_dir)


def _assert_lora_matches(lora_dir: Path, ref_dir: Path, tmp: Path) -> None:
    """The LoRA of `lora_dir` equals the one of `ref_dir` within float reduction noise, and stock
    SD3Pipeline.load_lora_weights reads it into every target module."""
    from safetensors.torch import load_file

    lora, ref = (load_file(d / "pytorch_lora_weights.safetensors") for d in (lora_dir, ref_dir))
    assert sorted(lora) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(lora[key], ref[key], rtol=0, atol=1e-4)
    assert max(v.abs().max() for k, v in lora.items() if "lora_B" in k) > 1e-3  # trained, not the zero init
    stock = build_tiny_sd3(tmp / "tok_lora")
    stock.load_lora_weights(str(lora_dir))
    adapted = {n.split(".lora_A")[0] for n, _ in stock.transformer.named_parameters() if ".lora_A" in n}
    assert all(any(name.endswith("." + target) for name in adapted) for target in TRANSFORMER_LORA_TARGETS)


def _assert_checkpoint_is_lora_only(checkpoint: Path, pipe_dir: Path) -> None:
    """DeepSpeed's files in `checkpoint` hold LoRA weights and their optimizer state (plus the
    transformer's buffers), far fewer numbers than the frozen transformer has."""
    from diffusers import SD3Transformer2DModel

    base = sum(p.numel() for p in SD3Transformer2DModel.from_pretrained(pipe_dir, subfolder="transformer").parameters())
    files = sorted(checkpoint.rglob("*_states.pt"))
    assert files, sorted(p.name for p in checkpoint.rglob("*"))
    saved = 0
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        buffers = set(state.get("buffer_names") or ())
        module = state.pop("module", None) or {}
        assert all("lora_" in k or k in buffers for k in module), sorted(module)[:5]
        saved += sum(v.numel() for k, v in module.items() if k not in buffers) + _numel(state)
    assert 0 < saved < base / 4, (saved, base)


def _numel(obj) -> int:
    """Elements of every tensor in a nest of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_numel(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_numel(v) for v in obj)
    return 0


def test_flow_recipe_checks_and_the_memoryless_warning():
    from deradiff.errors import UserError
    from deradiff.training.recipe_checks import recipe_warnings
    from deradiff.training.recipe_load import load_recipe

    base = ["method.beta=0.01", "model.kind=sd3", "method.name=kl_grad", "sample.scheduler=flow_euler"]
    with pytest.raises(UserError) as err:
        load_recipe(None, [*base, "method.noise_level=0", "method.eta=0", "model.max_sequence_length=0"])
    msg = str(err.value)
    assert "method.noise_level must be a finite number > 0" in msg and "model.max_sequence_length" in msg
    assert "method.eta" not in msg  # DDIM's eta is not read by flow families
    with pytest.raises(UserError, match="sample.scheduler=ddim does not fit model.kind=flux: use flow_euler"):
        load_recipe(None, ["method.beta=100", "model.kind=flux", "sample.prompts=[a cat]", "sample.scheduler=ddim"])
    with pytest.raises(UserError, match="model.drop_text_encoders applies to kl_grad / kl_pg"):
        load_recipe(None, ["method.beta=100", "model.kind=sd3", "model.drop_text_encoders=true"])
    with pytest.raises(UserError, match="set sample.prompts=\\[\\]"):
        load_recipe(None, [*base, "model.drop_text_encoders=true", "sample.prompts=[a cat]"])
    warnings = recipe_warnings(load_recipe(None, [*base, "method.noise_level=0.7"]))
    assert any("below the memoryless sqrt(2)" in w for w in warnings)
    assert not recipe_warnings(load_recipe(None, [*base, "method.noise_level=1.5"]))
