"""The procedural shapes domain: determinism, captions, dataset items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deradiff.toy import domain


def test_same_seed_and_index_give_the_same_image():
    a, spec_a = domain.sample(seed=3, index=17)
    b, spec_b = domain.sample(seed=3, index=17)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and spec_a == spec_b


def test_different_index_or_seed_gives_a_different_image():
    base, _ = domain.sample(seed=3, index=17)
    assert not np.array_equal(base, domain.sample(seed=3, index=18)[0])
    assert not np.array_equal(base, domain.sample(seed=4, index=17)[0])


def test_sample_does_not_depend_on_other_indices():
    ds = domain.ShapesDataset(50, seed=1)
    late_first = ds[40]["pixel_values"]
    _ = [ds[i] for i in range(40)]
    assert torch.equal(late_first, ds[40]["pixel_values"])


def test_all_captions_parse_back_to_their_spec():
    captions = domain.all_captions()
    assert len(captions) == len(set(captions)) == 48
    for caption in captions:
        assert domain.parse_caption(caption).caption == caption


def test_parse_is_case_and_comma_tolerant():
    assert domain.parse_caption("A Red circle, on a DARK background").caption == "a red circle on a dark background"


def test_unknown_words_are_named():
    with pytest.raises(ValueError, match="'pink'.*'hexagon'|pink"):
        domain.parse_caption("a pink hexagon on a dark background")
    with pytest.raises(ValueError, match="must name one shape"):
        domain.parse_caption("a red on a dark background")


def test_dataset_items_match_their_caption():
    ds = domain.ShapesDataset(12, seed=0, captions=domain.all_captions()[:6])
    for i in range(12):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
        spec = domain.parse_caption(item["caption"])
        assert item["caption"] == domain.all_captions()[i % 6]
        assert domain.SHAPES[item["shape"]] == spec.shape
        assert domain.COLOR_NAMES[item["color"]] == spec.color
        assert domain.BACKGROUND_NAMES[item["background"]] == spec.background
    with pytest.raises(IndexError):
        ds[12]


def test_background_and_color_are_where_they_should_be():
    spec = domain.ShapeSpec("square", "red", "dark", 0.5, 0.5, 0.3)
    img = domain.render(spec).astype(float) / 255
    assert np.allclose(img[0, 0], domain.BACKGROUNDS["dark"], atol=0.01)
    assert np.allclose(img[16, 16], domain.COLORS["red"], atol=0.01)
