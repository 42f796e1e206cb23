"""PickScore, HPSv2, aesthetic and CLIPScore through their real loading code, on tiny random-weight
models of the same architectures saved to disk (nothing is downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import _byte_level_tokenizer
from PIL import Image

from deradiff.errors import UserError
from deradiff.rewards import get_reward
from deradiff.rewards.clipscore import clip_pixels

TINY_OPEN_CLIP = "deradiff-tiny-vit"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + CLIPProcessor folder (model.safetensors), resize 40 -> crop 32."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("clip")
    n_vocab = len(_byte_level_tokenizer(root / "tok"))  # writes the folder the processor reads
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=n_vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "model")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tok"), model_max_length=77),
    )
    processor.save_pretrained(root / "model")
    assert (root / "model" / "model.safetensors").exists()
    return root / "model"


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """A tiny open_clip ViT registered under TINY_OPEN_CLIP and its weights as a published-style
    pickle ({'state_dict': ...} with DDP 'module.' prefixes) and as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hps")
    (root / "configs").mkdir()
    (root / "configs" / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(root / "configs")
    torch.manual_seed(0)
    state = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "hps.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "hps.safetensors")
    return root


@pytest.fixture(scope="module")
def aesthetic_mlp(tmp_path_factory):
    from safetensors.torch import save_file

    from deradiff.rewards.aesthetic import AestheticMLP

    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    state = AestheticMLP(16).state_dict()
    torch.save(state, root / "mlp.pth")
    save_file(state, root / "mlp.safetensors")
    return root


def _images(n: int = 3, size: int = 48) -> torch.Tensor:
    """n distinct structured images (n, 3, size, size) in [-1, 1]."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size // 8, size // 8, generator=gen).repeat_interleave(8, -1).repeat_interleave(8, -2) * 2 - 1


@pytest.fixture(scope="module")
def rewards(clip_dir, hps_checkpoint, aesthetic_mlp):
    return {
        "clipscore": get_reward("clipscore", model=str(clip_dir)),
        "pickscore": get_reward("pickscore", model=str(clip_dir), processor=str(clip_dir)),
        "hpsv2": get_reward("hpsv2", checkpoint=str(hps_checkpoint / "hps.pt"), arch=TINY_OPEN_CLIP),
        "aesthetic": get_reward("aesthetic", clip=str(clip_dir), mlp=str(aesthetic_mlp / "mlp.safetensors")),
    }


NAMES = ["clipscore", "pickscore", "hpsv2", "aesthetic"]
PROMPTS = ["a red circle", "a photo of a cat", "an astronaut riding a horse"]


@pytest.mark.parametrize("name", NAMES)
def test_shapes_batching_and_determinism(rewards, name):
    reward, images = rewards[name], _images()
    with torch.no_grad():
        batch = reward.score(images, PROMPTS)
        again = reward.score(images, PROMPTS)
        singles = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    assert batch.shape == (3,) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-4)
    assert batch.unique().numel() == 3  # distinct images score differently


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_wrt_images(rewards, name):
    images = _images(2).requires_grad_(True)
    rewards[name].score(images, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_pixel_preprocessing_matches_the_official_processor(clip_dir):
    """Our tensor resize/crop/normalize is the CLIPProcessor's PIL pipeline up to interpolation."""
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(str(clip_dir))
    image = _images(1, 48)
    pil = Image.fromarray(((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    official = processor(images=pil, return_tensors="pt")["pixel_values"]
    ours = clip_pixels(image, 40, 32, processor.image_processor.image_mean, processor.image_processor.image_std)
    assert ours.shape == official.shape == (1, 3, 32, 32)
    assert (ours - official).abs().mean() < 0.05


def _plant_text_projection(linear_or_param, pooled: torch.Tensor, target: torch.Tensor) -> None:
    """Make the text tower map `pooled` (H,) exactly onto `target` (D,): rank-one projection."""
    weight = torch.outer(target, pooled) / pooled.dot(pooled)
    with torch.no_grad():
        if isinstance(linear_or_param, torch.nn.Linear):
            linear_or_param.weight.copy_(weight)
        else:  # open_clip: x @ text_projection, (H, D)
            linear_or_param.copy_(weight.T)


def test_planted_signal_pickscore_and_clipscore_prefer_the_matching_image(clip_dir):
    """With the prompt's text embedding planted onto image A's embedding (computed through the
    official processor), A must outscore B for that prompt, by cosine exactly 1 vs < 1."""
    from deradiff.rewards.pickscore import PickScore

    reward = PickScore(model=str(clip_dir), processor=str(clip_dir)).eval()
    images = _images(2)
    a_pil = Image.fromarray(((images[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    with torch.no_grad():
        pixels = reward.processor(images=a_pil, return_tensors="pt")["pixel_values"]
        target = reward.model.get_image_features(pixel_values=pixels).pooler_output[0]
        tokens = reward.processor.tokenizer(["a preferred image"], return_tensors="pt")
        pooled = reward.model.text_model(**tokens).pooler_output[0]
        _plant_text_projection(reward.model.text_projection, pooled, target)
        scores = reward.score(images, ["a preferred image"] * 2)
        cos = scores / reward.model.logit_scale.exp()
    assert scores[0] > scores[1]
    assert cos[0] > 0.99 and cos[1] < cos[0]


def test_planted_signal_hpsv2(hps_checkpoint):
    from deradiff.rewards.hpsv2 import HPSv2

    reward = HPSv2(checkpoint=str(hps_checkpoint / "hps.safetensors"), arch=TINY_OPEN_CLIP).eval()
    images, prompt = _images(2, 32), "a preferred image"
    with torch.no_grad():
        target = reward.model.encode_image(clip_pixels(images[:1], *reward.geometry))[0]
        model = reward.model
        x = model.token_embedding(reward.tokenizer([prompt])) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        pooled = x[0, reward.tokenizer([prompt]).argmax(-1)[0]]  # EOT token position
        _plant_text_projection(model.text_projection, pooled, target)
        scores = reward.score(images, [prompt] * 2)
    assert scores[0] > 0.99 and scores[1] < scores[0]


def test_planted_signal_aesthetic(clip_dir, aesthetic_mlp):
    """An all-linear head set to read the direction of image A's embedding rates A highest."""
    from deradiff.rewards.aesthetic import AestheticScore

    reward = AestheticScore(clip=str(clip_dir), mlp=str(aesthetic_mlp / "mlp.pth")).eval()
    images = _images(3)
    with torch.no_grad():
        direction = reward.image_features(images[:1])[0]
        for i, layer in enumerate(m for m in reward.mlp.layers if isinstance(m, torch.nn.Linear)):
            layer.weight.zero_()
            layer.bias.zero_()
            if i == 0:
                layer.weight[0] = direction
            else:
                layer.weight[0, 0] = 1.0
        scores = reward.score(images, ["ignored"] * 3)
    assert scores.argmax() == 0
    torch.testing.assert_close(scores[0], torch.tensor(1.0), atol=1e-5, rtol=0)


def test_hps_pickle_and_safetensors_load_the_same_weights(rewards, hps_checkpoint):
    from deradiff.rewards.hpsv2 import HPSv2

    from_safetensors = HPSv2(checkpoint=str(hps_checkpoint / "hps.safetensors"), arch=TINY_OPEN_CLIP)
    images = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(rewards["hpsv2"].score(images, PROMPTS[:2]), from_safetensors.score(images, PROMPTS[:2]))


def test_pickle_that_runs_code_is_refused(tmp_path, clip_dir):
    """weights_only=True: a checkpoint holding an arbitrary object is refused, never unpickled."""
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": np.dtype("float32")}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="weights_only"):
        get_reward("aesthetic", clip=str(clip_dir), mlp=str(tmp_path / "evil.pth"))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("pickscore", {"model": "/nonexistent/PickScore_v1"}, "cannot load pickscore model from the hub id '/nonexistent"),
        ("clipscore", {"model": "nobody/no-such-clip"}, r"hub id 'nobody/no-such-clip'.*hf download"),
        ("hpsv2", {}, r"HPSv2 weights 'HPS_v2_compressed.pt' from hub repo 'xswu/HPSv2'.*checkpoint="),
        ("hpsv2", {"checkpoint": "/nonexistent/hps.pt"}, "checkpoint=/path/to/file"),
        ("hpsv2", {"version": "v2.1"}, r"HPSv2 weights 'HPS_v2.1_compressed.pt' from hub repo 'xswu/HPSv2'.*checkpoint="),
        ("hpsv2", {"version": "v2"}, r"unknown HPS version 'v2'; choose from \['v2.0', 'v2.1'\]"),
    ],
)
def test_missing_weights_say_where_and_how(name, kwargs, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=match):
        get_reward(name, **kwargs)


def test_aesthetic_head_of_the_wrong_size_is_refused(clip_dir, tmp_path):
    from safetensors.torch import save_file

    from deradiff.rewards.aesthetic import AestheticMLP

    save_file(AestheticMLP(768).state_dict(), tmp_path / "l14.safetensors")
    with pytest.raises(UserError, match="16-dim CLIP"):
        get_reward("aesthetic", clip=str(clip_dir), mlp=str(tmp_path / "l14.safetensors"))


def test_hps_versions_are_the_published_files():
    """version= picks the file of xswu/HPSv2: v2.0 (the default, as in the hpsv2 package) or v2.1."""
    from deradiff.rewards.hpsv2 import HPS_FILES, HPS_REPO

    assert HPS_REPO == "xswu/HPSv2"
    assert HPS_FILES == {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def test_hps_pickle_that_runs_code_is_refused(hps_checkpoint, tmp_path):
    """HPS checkpoints are pickles: read with weights_only=True, so one holding an arbitrary object is refused."""
    state = torch.load(hps_checkpoint / "hps.pt", weights_only=True)
    torch.save({**state, "payload": np.dtype("float32")}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "evil.pt"), arch=TINY_OPEN_CLIP)
