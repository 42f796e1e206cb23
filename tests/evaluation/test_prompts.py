"""Prompt-set loaders: text files and the toy split run here; hub sets fail clearly offline."""

from __future__ import annotations

import pytest

from deradiff.errors import UserError
from deradiff.evaluation.prompts import PROMPT_SETS, describe_sets, load_prompt_set
from deradiff.toy.prompts import test_prompts as toy_test_prompts


def test_text_file_drops_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\na cat\n\n  a dog  \na cat\n# end\nan owl\n")
    assert load_prompt_set(str(path)) == ["a cat", "a dog", "an owl"]
    assert load_prompt_set(str(path), max_prompts=2) == ["a cat", "a dog"]


def test_toy_sets():
    assert load_prompt_set("toy:test") == toy_test_prompts()
    assert len(load_prompt_set("toy:all")) == 48
    with pytest.raises(UserError, match="unknown toy prompt set"):
        load_prompt_set("toy:dev")


@pytest.mark.parametrize("spec", [*PROMPT_SETS, "hpsv2", "hpsv2:anime"])
def test_hub_sets_offline_give_a_clear_error(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match="cannot read .*text file"):
        load_prompt_set(spec, max_prompts=3)


def test_bad_specs():
    with pytest.raises(UserError, match="not found"):
        load_prompt_set("/nonexistent/prompts.txt")
    with pytest.raises(UserError, match="unknown HPSv2 benchmark style"):
        load_prompt_set("hpsv2:cartoons")
    with pytest.raises(UserError, match="max_prompts"):
        load_prompt_set("toy:test", max_prompts=0)
    assert "partiprompts" in describe_sets() and "hpsv2[:anime" in describe_sets()
