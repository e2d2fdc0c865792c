"""How infer_img_gen.sh and infer_vqa.sh fail: one `error:` line, exit status 2, before any model
is loaded and before anything is written (no demo cache built, no output directory made).

The commands run as a user runs them: `main(argv)` in this process (fast: nothing is loaded), and a
few through `bash scripts/...` in a fresh process.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emu3.cli import generate_image, outputs, vqa
from emu3.demo import DEMO_LLM_CONFIG, DEMO_VQ_CONFIG
from emu3.mllm.config import Emu3Config
from emu3.tokenizer import Emu3VisionVQConfig
from tests import tmpfs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory for the command, with a demo cache location that must stay unbuilt, and
    model loading turned into a failure (a check that let a bad request through fails at once)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMU3_DEMO_DIR", str(tmp_path / "never_built"))

    def no_loading(args):
        raise AssertionError("the command went on to load the models")

    for module in (generate_image, vqa):
        monkeypatch.setattr(module, "load", no_loading)
    return tmp_path


def refused(main, args, directory, capsys) -> str:
    """Run the command and return its one error line; check that nothing was loaded or written."""
    before = sorted(directory.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "RANDOM" not in err  # the demo banner comes with loading
    assert sorted(directory.rglob("*")) == before
    return lines[0]


@pytest.mark.parametrize("main, args, message", [
    # numbers
    (generate_image.main, ["--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (generate_image.main, ["--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0.0"),
    (generate_image.main, ["--top-p", "0"], "argument --top-p: must be a finite number in (0, 1], got 0.0"),
    (generate_image.main, ["--top-p", "inf"], "argument --top-p: must be a finite number in (0, 1], got inf"),
    (generate_image.main, ["--top-k", "-5"], "argument --top-k: must be an integer >= 0, got -5"),
    (generate_image.main, ["--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number >= 1"),
    (generate_image.main, ["--guidance-scale", "0.5"], "argument --guidance-scale: must be a finite number >= 1"),
    (generate_image.main, ["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (generate_image.main, ["--seed", "1.5"], "argument --seed: must be an integer >= 0, got '1.5'"),
    (generate_image.main, ["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (generate_image.main, ["--parallel-window", "0"], "argument --parallel-window: must be an integer >= 1, got 0"),
    (generate_image.main, ["--image-area", "big"], "argument --image-area: must be an integer >= 1, got 'big'"),
    (generate_image.main, ["--image-area", "100000000"], "cannot fit the model's context window of 9216 tokens"),
    (generate_image.main, ["--ratio", "16/9"], "ratio must be 'W:H'"),
    (generate_image.main, ["--ratio", "16:9", "--image-area", "20"], "too small for ratio 16:9"),
    (vqa.main, ["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (vqa.main, ["--max-new-tokens", "9216"], "--max-new-tokens 9216 leaves no room for the prompt"),
    (vqa.main, ["--sample", "--temperature", "-1"], "argument --temperature: must be a finite number > 0"),
    (vqa.main, ["--top-p", "nan"], "argument --top-p: must be a finite number in (0, 1], got nan"),
    # options
    (generate_image.main, ["--bogus"], "unrecognized arguments: --bogus (see infer_img_gen.sh --help)"),
    (vqa.main, ["--model", "."], "give both --model and --vq"),
    (vqa.main, ["--model", "nowhere", "--vq", "."], "--model nowhere is not a directory"),
    (vqa.main, ["--question", "a", "--question", "b"], "one --question for all images or one per image"),
    # images
    (vqa.main, ["--image", "missing.png"], "image file missing.png does not exist"),
])
def test_bad_options_are_refused_before_loading(main, args, message, user_dir, capsys):
    assert message in refused(main, args, user_dir, capsys)


def test_unreadable_images_are_named_before_loading(user_dir, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(user_dir / "good.png")
    data = (user_dir / "good.png").read_bytes()
    (user_dir / "cut.png").write_bytes(data[:len(data) // 2])
    line = refused(vqa.main, ["--image", "good.png", "--image", "cut.png"], user_dir, capsys)
    assert line == "error: cut.png cannot be read as an image: image file is truncated"
    Image.fromarray(np.ones((64, 64), np.float32)).save(user_dir / "depth.tiff")
    line = refused(vqa.main, ["--image", "depth.tiff"], user_dir, capsys)
    assert "depth.tiff has 32-bit floating-point pixels (PIL mode F), whose range is not known" in line
    Image.fromarray(np.zeros((200, 20, 3), np.uint8)).save(user_dir / "strip.png")
    line = refused(vqa.main, ["--image", "strip.png"], user_dir, capsys)
    assert line == "error: strip.png: image of 200x20 pixels has aspect ratio 10.00; at most 5 is supported, crop it first"
    # The demo keeps a 128x128 picture at 128x128 pixels: 16x16 tokens plus 16 row ends = 272.
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(user_dir / "big.png")
    line = refused(vqa.main, ["--image", "big.png", "--max-new-tokens", "8944"], user_dir, capsys)
    assert line == "error: big.png becomes 272 tokens (16x16 plus row ends), which with --max-new-tokens 8944 pass " \
                   "the model's context window of 9216: lower --max-new-tokens or use a smaller image"


def _config_dirs(root: Path, edit_llm=None) -> tuple[Path, Path]:
    """--model and --vq directories holding config.json files only: no weights anywhere, so a
    command that gets past its checks would fail at loading, not succeed."""
    llm, vq = root / "llm", root / "vq"
    llm.mkdir()
    vq.mkdir()
    config = Emu3Config(**DEMO_LLM_CONFIG).to_dict()
    if edit_llm:
        edit_llm(config)
    (llm / "config.json").write_text(json.dumps(config))
    (vq / "config.json").write_text(json.dumps(Emu3VisionVQConfig(**DEMO_VQ_CONFIG).to_dict()))
    return llm, vq


def test_bad_configs_are_refused_before_any_weights(user_dir, capsys):
    llm, vq = _config_dirs(user_dir, lambda c: c.pop("hidden_size"))
    line = refused(generate_image.main, ["--model", str(llm), "--vq", str(vq)], user_dir, capsys)
    assert line == f"error: {llm}/config.json lacks required keys ['hidden_size']: an Emu3 checkpoint's config " \
                   "names them, and a guessed value would load a different model"
    (llm / "config.json").write_text(json.dumps({**Emu3Config(**DEMO_LLM_CONFIG).to_dict(), "rms_norm_eps": "1e-5"}))
    line = refused(vqa.main, ["--model", str(llm), "--vq", str(vq), "--image", "x.png"], user_dir, capsys)
    assert line == f"error: {llm}/config.json: rms_norm_eps must be a finite number > 0, got '1e-5'"
    # The directories swapped: the language model's config is not a vision tokenizer's.
    (llm / "config.json").write_text(json.dumps(Emu3Config(**DEMO_LLM_CONFIG).to_dict()))
    line = refused(generate_image.main, ["--model", str(llm), "--vq", str(llm)], user_dir, capsys)
    assert "describes another model (model_type 'Emu3'), not Emu3's vision tokenizer" in line
    (llm / "config.json").write_text("{\"hidden_size\": 64,")
    line = refused(generate_image.main, ["--model", str(llm), "--vq", str(vq)], user_dir, capsys)
    assert line.startswith(f"error: {llm}/config.json is not valid JSON")


def test_output_paths_are_checked_before_loading(user_dir, capsys):
    (user_dir / "taken").write_text("a file, not a directory")
    line = refused(generate_image.main, ["--output-dir", "taken"], user_dir, capsys)
    assert line == "error: --output-dir taken exists and is not a directory"
    line = refused(generate_image.main, ["--output-dir", "taken/out"], user_dir, capsys)
    assert line.startswith("error: --output-dir taken/out cannot be written")
    (user_dir / "answers").mkdir()
    line = refused(vqa.main, ["--output", "answers"], user_dir, capsys)
    assert line == "error: --output answers is a directory: give a file name"
    (user_dir / "out" / "000_a_portrait_of_young_girl.png").mkdir(parents=True)
    line = refused(generate_image.main, ["--output-dir", "out"], user_dir, capsys)
    assert line == "error: cannot write out/000_a_portrait_of_young_girl.png: a directory of that name is in the way"


def test_a_read_only_or_full_disk_is_refused_before_loading(user_dir, capsys):
    with tmpfs.mounted(user_dir / "ro", read_only=True):
        line = refused(generate_image.main, ["--output-dir", "ro/out"], user_dir, capsys)
        assert line == "error: --output-dir ro/out cannot be written: Read-only file system"
        line = refused(vqa.main, ["--output", "ro/answers.jsonl"], user_dir, capsys)
        assert line == "error: the directory of --output ro cannot be written: Read-only file system"
    with tmpfs.mounted(user_dir / "full", size_kib=64) as full:
        tmpfs.fill(full)
        line = refused(generate_image.main, ["--output-dir", "full"], user_dir, capsys)
        assert line.startswith("error: --output-dir full: the disk has 0.0 MB free, the outputs need about")


def test_an_output_in_use_by_another_run_is_refused(user_dir, capsys):
    (user_dir / "out").mkdir()
    with outputs.locked(user_dir / "out", "--output-dir"):
        line = refused(generate_image.main, ["--output-dir", "out"], user_dir, capsys)
    assert line == f"error: --output-dir out is in use by another run (pid {os.getpid()} on {os.uname().nodename}): " \
                   "wait for it to finish or choose another output"
    assert list((user_dir / "out").iterdir()) == []  # the lock is gone with its holder
    with outputs.locked(user_dir / "answers.jsonl", "--output"):
        line = refused(vqa.main, ["--output", "answers.jsonl"], user_dir, capsys)
    assert "error: --output answers.jsonl is in use by another run" in line


@pytest.mark.parametrize("script, args, message", [
    ("infer_img_gen.sh", ["--temperature", "nan"], "error: argument --temperature: must be a finite number > 0, "
                                                   "got nan (see infer_img_gen.sh --help)"),
    ("infer_vqa.sh", ["--image", "cat.png"], "error: image file cat.png does not exist"),
])
def test_a_user_sees_one_line_and_a_failing_status(script, args, message, tmp_path):
    env = {**os.environ, "GLOG_v": "3", "EMU3_DEMO_DIR": str(tmp_path / "never_built")}
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
