"""gigatron.cli.run_cli: user errors are one line and exit 2; bugs keep their traceback."""

import pytest

from gigatron.cli import USER_ERROR_EXIT_CODE, run_cli


def _raises(error):
    def main(argv):
        raise error
    return main


def test_user_error_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("GIGATRON_DEBUG", raising=False)
    assert run_cli(_raises(ValueError("--foo needs --bar; add --bar 2"))) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert "error: --foo needs --bar; add --bar 2" in err
    assert "Traceback" not in err


def test_missing_file_is_a_user_error(capsys, monkeypatch):
    monkeypatch.delenv("GIGATRON_DEBUG", raising=False)
    assert run_cli(_raises(FileNotFoundError("no such file: data.idx"))) == USER_ERROR_EXIT_CODE
    assert "error: no such file: data.idx" in capsys.readouterr().err


def test_bug_keeps_traceback(monkeypatch):
    monkeypatch.delenv("GIGATRON_DEBUG", raising=False)
    with pytest.raises(KeyError):
        run_cli(_raises(KeyError("internal")))


def test_debug_shows_traceback_of_user_errors(monkeypatch):
    monkeypatch.setenv("GIGATRON_DEBUG", "1")
    with pytest.raises(ValueError):
        run_cli(_raises(ValueError("bad flag")))


def test_return_code_passes_through():
    assert run_cli(lambda argv: None) == 0
    assert run_cli(lambda argv: 3) == 3
