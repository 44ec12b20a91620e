"""The `staprune` entry point: commands are registered, user errors print one line."""

from __future__ import annotations

import pytest

from staprune.cli import COMMANDS, build_parser, main


def test_every_command_is_registered_and_has_help(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    for name in COMMANDS:
        assert name in listing
    build_parser()  # every command module imports and declares its arguments


def test_user_error_is_one_line_with_exit_code_2(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("STAPRUNE_TRACEBACK", raising=False)
    missing = tmp_path / "nothing.txt"
    rc = main(["eval", "--model", "ViT-S", "--data", str(missing), "--method", "none", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("staprune eval: error:") and str(missing.name) in err
    assert "Traceback" not in err


def test_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("STAPRUNE_TRACEBACK", "1")
    with pytest.raises((FileNotFoundError, ValueError)):
        main(["eval", "--model", "ViT-S", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "o")])


def test_eval_without_model_and_data_runs_the_demo(monkeypatch, tmp_path, capsys):
    from staprune.commands import demo as runner

    calls = []
    monkeypatch.setattr(runner, "main", lambda argv: calls.append(argv) or 0)
    assert main(["eval", "--out", str(tmp_path / "d"), "--json"]) == 0
    assert calls == [["--json", "--out", str(tmp_path / "d")]]
    monkeypatch.delenv("STAPRUNE_TRACEBACK", raising=False)
    assert main(["eval", "--model", "ViT-S"]) == 2  # one without the other is a user error
    assert "give both --model and --data" in capsys.readouterr().err
