"""Finding and reading reward-model weights: hub ids or local paths, safetensors preferred.

Every failure becomes a UserError that says where the weights were looked for and how to
supply them, so a missing download or an offline machine is one readable line, not a trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deradiff.errors import UserError


def _offline_note() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return " (HF_HUB_OFFLINE is set: only the local Hugging Face cache was searched)" if offline else ""


def fetch_file(spec: str | os.PathLike, what: str, param: str) -> Path:
    """A local weights file: `spec` is a path, or "<repo_id>:<filename>" on the Hugging Face hub
    (downloaded into / read from the hub cache). `what` names the model and `param` the
    argument that supplies a local file, both for the error message."""
    path = Path(spec)
    if path.is_file():
        return path
    repo, sep, filename = str(spec).partition(":")
    if not sep or repo.count("/") != 1 or not filename:
        raise UserError(f"{what} weights file {str(spec)!r} not found: pass {param}=/path/to/file "
                        f"or {param}=<hub repo id>:<file name>")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as err:  # offline, missing file, auth: all mean the file is not at hand
        raise UserError(
            f"cannot get {what} weights {filename!r} from hub repo {repo!r}{_offline_note()}: "
            f"{str(err).strip().splitlines()[0]}. Download it once (`hf download {repo} {filename}`) "
            f"or pass {param}=/path/to/{filename}"
        ) from None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a published pickle checkpoint read with
    torch.load(weights_only=True), which only rebuilds tensors and plain containers and never
    runs code. A {"state_dict": ...} wrapper and DDP's "module." prefixes are removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"{path} is not a plain tensor checkpoint that torch.load(weights_only=True) can read "
                            f"({str(err).strip().splitlines()[0]}); convert it to .safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def from_pretrained(cls, name_or_path: str, what: str, param: str, **kwargs):
    """`cls.from_pretrained(name_or_path, **kwargs)` (a transformers model or processor) with a
    UserError naming the folder / hub id looked in and how to supply it."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        where = f"local folder {name_or_path}" if Path(name_or_path).exists() else f"hub id {name_or_path!r}{_offline_note()}"
        hint = ""
        if kwargs.get("use_safetensors"):
            hint = (" If the folder only has a pickled pytorch_model.bin, convert it to safetensors or pass "
                    "use_safetensors=false (transformers then reads it with torch.load(weights_only=True)).")
        raise UserError(
            f"cannot load {what} from the {where}: {str(err).strip().splitlines()[0]}. Download it once "
            f"(`hf download {name_or_path}`) or pass {param}=/path/to/folder.{hint}"
        ) from None
