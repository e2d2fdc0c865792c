"""Options checked as they are parsed: one line, exit status 2, nothing built (the benchmark here;
the inference commands in tests/mllm/test_script_failures.py and tests/tokenizer/test_reconstruct_cli.py)."""

import pytest

from emu3.cli import benchmark


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["--threads", "two"], "argument --threads: must be an integer >= 1, got 'two'"),
    (["--decode-steps", "-3"], "argument --decode-steps: must be an integer >= 1, got -3"),
    (["--sft-seq-len", "1"], "argument --sft-seq-len: must be an integer >= 2, got 1"),
    (["--tables", "vq,speed"], "argument --tables: unknown tables ['speed']; choose from vq, t2i, decode, text, vqa, sft, parallel"),
    (["--positions", "100,-5"], "argument --positions: must be a comma list of positive integers, got '100,-5'"),
    (["--image-tokens", "8x0"], "argument --image-tokens: must be HxW with two positive integers, got '8x0'"),
    (["--vq-resolution", "100x100"], "argument --vq-resolution: must be HxW with two positive integers that are "
                                     "multiples of 8, got '100x100'"),
    (["--config", "nowhere"], "--config nowhere is neither tiny nor small nor a directory"),
    (["--vq", "nowhere"], "--vq nowhere is neither tiny nor emu3 nor a directory"),
    (["--compare-reference", "--device", "Ascend"], "--compare-reference runs the PyTorch reference on the CPU"),
    (["--compare-reference", "--config", "."], "--compare-reference builds both models from the same random weights"),
])
def test_bad_benchmark_options_stop_before_any_model(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "Bench", None)  # calling it would fail: nothing may be built
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_benchmark_output_stops_before_any_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "Bench", None)
    (tmp_path / "results.md").mkdir()
    with pytest.raises(SystemExit):
        benchmark.main(["--output", str(tmp_path / "results.md")])
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'results.md'} is a directory: give a file name\n"


def test_a_console_script_names_itself_in_errors(monkeypatch, capsys):
    from emu3.cli import vqa
    monkeypatch.setattr("sys.argv", ["/venv/bin/emu3-vqa"])
    with pytest.raises(SystemExit) as exit_info:
        vqa.main(["--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("(see emu3-vqa --help)")
