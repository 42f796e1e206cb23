"""Where the shipped toy weights live, and their SHA-256 manifest.

Layout of an asset root (the package's `assets/` folder, or `deradiff toy pretrain --out DIR`):
`pipeline/` (a diffusers `StableDiffusionPipeline.save_pretrained` folder), `classifier/`,
`quality.json` (what pretraining measured) and `manifest.json` ({relative path: sha256}).
The flow-matching twin's root (`assets/flow/`, deradiff.toy.flow) nests inside the package's
root with its own manifest; a root's manifest leaves nested roots out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deradiff.errors import UserError
from deradiff.io import sha256_file, write_json_atomic

ASSET_DIR = Path(__file__).resolve().parent / "assets"
MANIFEST_NAME = "manifest.json"
REBUILD_HINT = "rebuild them with `deradiff toy pretrain` (about 30 min on 2 CPU cores)"


def nested_roots(root: Path) -> list[Path]:
    """Folders below `root` holding their own manifest (separately verified asset roots)."""
    return sorted(p.parent for p in root.rglob(MANIFEST_NAME) if p.parent != root)


def _files(root: Path) -> list[Path]:
    nested = nested_roots(root)
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp") and "__pycache__" not in p.parts
        and not any(n in p.parents for n in nested)
    )


def write_manifest(root: str | os.PathLike) -> Path:
    """Hash every file under `root` into `root/manifest.json` (written atomically)."""
    root = Path(root)
    manifest = {p.relative_to(root).as_posix(): sha256_file(p) for p in _files(root)}
    return write_json_atomic(root / MANIFEST_NAME, manifest)


def verify_manifest(root: str | os.PathLike, hint: str = REBUILD_HINT) -> dict[str, str]:
    """Check every file listed in `root/manifest.json`; raise UserError naming the missing or
    corrupt files and `hint` (how to rebuild them). Returns the manifest."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        raise UserError(f"toy weights missing: no {MANIFEST_NAME} in {root}; {hint}")
    manifest = json.loads(manifest_path.read_text())
    missing = [name for name in manifest if not (root / name).is_file()]
    corrupt = [name for name in manifest if name not in missing and sha256_file(root / name) != manifest[name]]
    if missing or corrupt:
        problems = [f"missing {missing}"] * bool(missing) + [f"checksum mismatch {corrupt}"] * bool(corrupt)
        raise UserError(f"toy weights in {root} are damaged ({'; '.join(problems)}); {hint}")
    return manifest
