"""The command line's routing and its usage errors: one line naming the flag, exit status 2."""

from __future__ import annotations

import pytest

from deradiff.cli import COMMANDS, main


@pytest.mark.parametrize("argv, words", [
    (["bogus"], ["argument COMMAND", "invalid choice: 'bogus'"]),
    (["evaluate", "--out", "x", "--scheduler", "fancy"], ["argument --scheduler", "invalid choice: 'fancy'"]),
    (["sample", "--seeds", "one"], ["argument --seeds", "invalid int value: 'one'"]),
    (["search", "--out", "x", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
])
def test_usage_errors_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deradiff") and "--help" in err, err
    assert all(w in err for w in words), err


def test_every_command_module_exists():
    import importlib

    for module, _ in COMMANDS.values():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), module
