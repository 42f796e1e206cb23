"""Prompt-set loaders: text files and the toy split run here; hub sets fail clearly offline."""

from __future__ import annotations

import pytest

from deradiff.errors import UserError
from deradiff.prompts import HUB_SETS, describe_sets, load_prompts
from deradiff.toy.prompts import test_prompts as toy_test_prompts


def test_text_file_drops_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\na cat\n\n  a dog  \na cat\n# end\nan owl\n")
    assert load_prompts(str(path)) == ["a cat", "a dog", "an owl"]
    assert load_prompts(str(path), max_prompts=2) == ["a cat", "a dog"]


def test_toy_sets():
    assert load_prompts("toy:test") == toy_test_prompts()
    assert len(load_prompts("toy:all")) == 48
    with pytest.raises(UserError, match="unknown toy prompt set"):
        load_prompts("toy:dev")


@pytest.mark.parametrize("spec", [*HUB_SETS, "hpsv2", "hpsv2:anime"])
def test_hub_sets_offline_give_a_clear_error(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match="cannot read .*text file"):
        load_prompts(spec, max_prompts=3)


def test_bad_specs():
    with pytest.raises(UserError, match="not found"):
        load_prompts("/nonexistent/prompts.txt")
    with pytest.raises(UserError, match="unknown HPSv2 benchmark style"):
        load_prompts("hpsv2:cartoons")
    with pytest.raises(UserError, match="max_prompts"):
        load_prompts("toy:test", max_prompts=0)
    assert "partiprompts" in describe_sets() and "hpsv2[:anime" in describe_sets()


def test_text_file_and_registered_sets(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n a red circle \n\nsecond prompt # not a comment\na red circle\n   \n# last\n")
    assert load_prompts(str(path)) == ["a red circle", "second prompt # not a comment"]
    assert load_prompts(str(path), max_prompts=1) == ["a red circle"]
    test = load_prompts("toy:test")
    train = load_prompts("toy:train")
    assert len(test) == 12 and not set(test) & set(train)
    assert load_prompts("toy") == train
    with pytest.raises(UserError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# only comments\n\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="unknown toy prompt set"):
        load_prompts("toy:val")


@pytest.mark.parametrize("spec, named", [("hpsv2:anime", True), ("hf:a/b", True), ("toy:test", True),
                                         ("partiprompts", True), ("missing.txt", False)])
def test_names_a_set_tells_registered_and_hub_sets_from_files(spec, named):
    from deradiff.prompts import names_a_set

    assert names_a_set(spec) is named
