"""Checked values where they enter: lambdas (finite, >= 0), steps (>= 1), guidance (>= 0) and
beta0 (> 0) are refused at parse time by sample, evaluate, search and validate with one line
naming the flag (exit status 2), before any file or model is touched."""

from __future__ import annotations

import pytest

from deradiff.cli import main
from deradiff.errors import UserError
from deradiff.evaluation.lams import LAM_POLICY, constant, equivalent_beta, parse_grid, parse_lam

COMMANDS = {
    "sample": ["sample", "--prompt", "x"],
    "evaluate": ["evaluate", "--out", "{out}"],
    "search": ["search", "--out", "{out}", "--maximize", "reward/toy"],
    "validate": ["validate", "--out", "{out}", "--baselines", "b"],
}
LAM_FLAG = {"sample": "--lam", "evaluate": "--lam", "search": "--grid"}


def _refused(command: str, tmp_path, capsys, *argv: str) -> str:
    base = [w.format(out=tmp_path / "out") for w in COMMANDS[command]]
    with pytest.raises(SystemExit) as exit_:
        main([*base, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback, no usage block
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("command", ["sample", "evaluate", "search"])
@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--steps", "-3"], "argument --steps: must be an integer >= 1, got '-3'"),
    (["--guidance", "-1"], "argument --guidance: must be >= 0, got '-1'"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["--noise-level", "-1"], "argument --noise-level: must be >= 0, got '-1'"),
])
def test_non_positive_steps_and_negative_guidance_are_refused(command, argv, message, tmp_path, capsys):
    assert message in _refused(command, tmp_path, capsys, *argv)


@pytest.mark.parametrize("command", ["sample", "evaluate", "search"])
@pytest.mark.parametrize("value, message", [
    ("-1", "lambda must be >= 0"),
    ("nan", "lambda must be a finite number, got 'nan'"),
    ("inf", "lambda must be a finite number, got 'inf'"),
])
def test_negative_and_non_finite_lambdas_are_refused(command, value, message, tmp_path, capsys):
    flag = LAM_FLAG[command]
    assert f"argument {flag}: {message}" in _refused(command, tmp_path, capsys, flag, "0", value)


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_schedules_with_a_negative_end_are_refused(command, tmp_path, capsys):
    assert "argument --lam: lambda must be >= 0" in _refused(command, tmp_path, capsys, "--lam", "cosine:1,-2")


@pytest.mark.parametrize("command", ["evaluate", "search", "validate"])
def test_a_non_positive_beta0_is_refused(command, tmp_path, capsys):
    assert "argument --beta0: must be > 0, got '-1'" in _refused(command, tmp_path, capsys, "--beta0", "-1")


@pytest.mark.parametrize("command", ["sample", "evaluate", "search", "validate"])
def test_help_states_the_lambda_policy(command, capsys):
    with pytest.raises(SystemExit):
        main([COMMANDS[command][0], "--help"])
    assert " ".join(LAM_POLICY.split()) in " ".join(capsys.readouterr().out.split())


def test_lambdas_are_parsed_once_into_named_values():
    lam = parse_lam("linear:0,2")
    assert lam.name == "linear:0,2" and lam.value is None and lam.schedule.end == 2.0
    assert parse_lam("0.50").name == "0.5" and parse_lam("0.50").value == 0.5
    assert parse_lam(lam) is lam and constant(2) == parse_lam("2.0")
    assert [str(v) for v in parse_grid(["0", "0.5", "linear:0,2"])] == ["0", "0.5", "linear:0,2"]
    with pytest.raises(UserError, match="empty"):
        parse_grid([])
    with pytest.raises(UserError, match=r"duplicates: \['1'\]"):
        parse_grid(["1", "0.5", "1.0"])
    with pytest.raises(UserError, match="lambda must be >= 0"):
        constant(-0.5)


def test_the_emulated_beta_is_never_negative():
    assert equivalent_beta(1000.0, 4.0) == 250.0
    assert equivalent_beta(1000.0, 0.0) is None and equivalent_beta(None, 2.0) is None
    with pytest.raises(UserError):
        equivalent_beta(1000.0, -500.0)


def test_the_logged_command_runs_as_written(tmp_path):
    """Empty lists (no --baselines, no --weights) are left out: `--baselines` alone would not parse."""
    import argparse
    import shlex

    from deradiff.evaluation.options import log_command

    args = argparse.Namespace(_name="evaluate", out=str(tmp_path), lam=[parse_lam("0"), parse_lam("linear:0,2")],
                              baselines=[], merge=False, shard=None, steps=3)
    log_command(tmp_path, args)
    line = (tmp_path / "commands.txt").read_text().strip()
    assert shlex.split(line) == ["deradiff", "evaluate", "--out", str(tmp_path), "--lam", "0", "linear:0,2",
                                 "--steps", "3"]
