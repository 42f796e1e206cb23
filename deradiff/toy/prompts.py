"""The toy prompt set: a fixed train/test split of the 48 domain captions.

Test captions are held out from training of aligned models (pretraining sees all captions).
The 12 test captions are (shape k mod 4, color k mod 6, background k // 6) for k = 0..11: each
shape appears 3 times, each color twice, each background 6 times, and every test caption's
shape-color pair appears in training with the other background, so the split asks the aligned
model to generalize over combinations, not to meet new words.
"""

from __future__ import annotations

from deradiff.toy.domain import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, ShapeSpec, all_captions


def test_prompts() -> list[str]:
    """The 12 held-out captions, in a fixed order."""
    return [
        ShapeSpec(SHAPES[k % len(SHAPES)], COLOR_NAMES[k % len(COLOR_NAMES)], BACKGROUND_NAMES[k // 6]).caption
        for k in range(12)
    ]


def train_prompts() -> list[str]:
    """The other 36 captions, in domain.all_captions() order."""
    held_out = set(test_prompts())
    return [c for c in all_captions() if c not in held_out]


def prompt_set(name: str) -> list[str]:
    """'train', 'test' or 'all' -> captions; UserError otherwise."""
    from deradiff.errors import UserError

    sets = {"train": train_prompts, "test": test_prompts, "all": all_captions}
    if name not in sets:
        raise UserError(f"unknown toy prompt set {name!r}; choose from {sorted(sets)}")
    return sets[name]()
