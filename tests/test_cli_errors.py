"""The end of every command: expected failures as one line and exit status 2, bugs as tracebacks."""

import subprocess
import sys

import pytest

from emu3.cli.errors import command


@command
def _fails_with(argv=None):
    raise argv


@pytest.mark.parametrize("error", [ValueError("bad ratio '0:1'"), FileNotFoundError(2, "No such file", "x.png")])
def test_expected_failures_are_one_line(capsys, error):
    with pytest.raises(SystemExit) as exit_info:
        _fails_with(error)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        _fails_with(ZeroDivisionError("a bug"))


def test_ctrl_c_exits_130(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _fails_with(KeyboardInterrupt())
    assert exit_info.value.code == 130


def test_the_traceback_can_be_asked_for(monkeypatch):
    monkeypatch.setenv("EMU3_TRACEBACK", "1")
    with pytest.raises(ValueError):
        _fails_with(ValueError("shown with its traceback"))


def test_a_real_process_prints_one_line_and_fails():
    code = "from emu3.cli.errors import command\n@command\ndef main(argv=None):\n    raise ValueError('no such ratio')\nmain()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no such ratio"
