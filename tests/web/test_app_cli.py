"""The web demo's command line refuses what it cannot run, in one sentence, before loading anything."""

import sys

import pytest

from emu3.web import app


@pytest.mark.parametrize("argv,message", [
    (["--chat-model", "/nowhere"], "--chat-model goes with --model and --vq"),
    ([], "the web demo needs gradio: pip install -r requirements-demo.txt"),
    (["--port", "0"], "argument --port: must be an integer in [1, 65535], got 0"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: must be an integer >= 1, got '2.5'"),
])
def test_refusals(argv, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as where the demo extra is not installed
    monkeypatch.setattr(app, "load", lambda args: pytest.fail("loaded models before refusing"))
    with pytest.raises(SystemExit) as exit_:
        app.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
