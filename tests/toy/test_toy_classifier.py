"""The shipped toy classifier: accuracy on fresh real images, feature API, save/load."""

from __future__ import annotations

import pytest
import torch

from deradiff.toy import classifier as clf
from deradiff.toy.domain import ShapesDataset


@pytest.fixture(scope="module")
def shipped():
    return clf.load_classifier()


def test_shipped_classifier_reads_fresh_images(shipped):
    # seed 777 is neither the training stream nor clf.evaluate_classifier's default
    acc = clf.evaluate_classifier(shipped, n=512, seed=777)
    assert all(acc[k] > 0.95 for k in clf.HEADS), acc


def test_shipped_classifier_is_not_fooled_by_shuffled_labels(shipped):
    ds = ShapesDataset(256, seed=778)
    images = torch.stack([ds[i]["pixel_values"] for i in range(256)])
    colors = torch.tensor([ds[i]["color"] for i in range(256)])
    pred = shipped.predict(images)["color"]
    assert (pred == colors).float().mean() > 0.95
    assert (pred == colors.roll(1)).float().mean() < 0.4


def test_logits_and_features_shapes(shipped):
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    logits = shipped.logits(x)
    assert {k: v.shape for k, v in logits.items()} == {k: (5, n) for k, n in clf.HEADS.items()}
    assert shipped.features(x).shape == (5, shipped.config.feature_dim)
    assert shipped.features(torch.rand(2, 3, 64, 64)).shape == (2, shipped.config.feature_dim)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = clf.ShapeClassifier().eval()
    clf.save_classifier(model, tmp_path / "clf")
    loaded = clf.load_classifier(tmp_path / "clf")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(model.features(x), loaded.features(x))


def test_saved_bytes_are_those_the_shipped_manifest_hashes(tmp_path):
    # The asset manifest hashes these files, so the atomic write must not change a byte:
    # safetensors' own save_file, and config.json without a trailing newline.
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = clf.ShapeClassifier(clf.ClassifierConfig())
    clf.save_classifier(model, tmp_path / "c")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "ref.safetensors")
    assert (tmp_path / "c" / clf.WEIGHTS_NAME).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "c" / clf.CONFIG_NAME).read_text() == json.dumps(asdict(model.config), indent=2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([clf.WEIGHTS_NAME, clf.CONFIG_NAME])

def test_training_is_deterministic_and_learns():
    a = clf.train_classifier(steps=30, batch_size=32, progress=False)
    b = clf.train_classifier(steps=30, batch_size=32, progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert clf.evaluate_classifier(a, n=256)["background"] > 0.8  # the easiest head, after 30 steps
