"""Bad input ends a training command with one `error:` line and exit status 2 before the model
loads: numeric options out of range, bad configs, data of the other task or damaged feature files.
A run whose loss stops being finite ends with a clear message and never saves NaN weights."""

import json

import numpy as np
import pytest

from emu3.weights import read_safetensors
from train import checkpoint, merge_zero_shards
from train.sft import Run, main, parse_args

from .conftest import grid, make_data, make_model_dir


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return make_data(root, [{"name": f"s{i}", "images": grid(i, 2, 2), "texts": f"sample {i}"} for i in range(2)])


def fails(capsys, argv, command=main) -> str:
    """The one error line of a command that must fail with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("option, value, message", [
    ("lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("lr", "-1e-5", "--lr must be a finite number > 0"),
    ("min_lr", "inf", "--min_lr must be a finite number >= 0"),
    ("min_lr", "1e-3", "--min_lr 0.001 is above --lr 1e-05"),
    ("save_steps", "0", "--save_steps must be an integer >= 1"),
    ("batch_size", "0", "--batch_size must be an integer >= 1"),
    ("grad_accum", "-2", "--grad_accum must be an integer >= 1"),
    ("max_steps", "0", "--max_steps must be an integer >= 1"),
    ("warmup_steps", "500", "--warmup_steps 500 exceeds --max_steps 400"),
    ("weight_decay", "nan", "--weight_decay must be a finite number >= 0"),
    ("adam_beta1", "1", "--adam_beta1 must be a finite number in [0, 1)"),
    ("adam_beta2", "-0.1", "--adam_beta2 must be a finite number in [0, 1)"),
    ("adam_eps", "0", "--adam_eps must be a finite number > 0"),
    ("max_grad_norm", "-inf", "--max_grad_norm must be a finite number >= 0"),
    ("loss_scale", "0.5", "--loss_scale must be a finite number >= 1"),
    ("null_prompt_prob", "1.5", "--null_prompt_prob must be a finite number in [0, 1]"),
    ("seed", "-1", "--seed must be an integer in [0, 4294967295]"),
    ("max_length", "33", "--max_length 33 must be a multiple of --sp_size 2"),
    ("attn_implementation", "flash", "--attn_implementation must be one of eager, flash_attention_2"),
    ("mode", "eager", "--mode must be one of pynative, graph"),
    ("device", "gpu", "--device must be one of CPU, Ascend; got 'gpu'"),
])
def test_options_are_checked_before_anything_loads(capsys, tmp_path, option, value, message):
    # model and data do not exist: the option must be what is reported
    argv = ["--model_path", str(tmp_path / "no_model"), "--data_path", str(tmp_path / "no_data"),
            "--output_dir", str(tmp_path / "out"), "--sp_size", "2", f"--{option}={value}"]
    assert message in fails(capsys, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "--lr must be a finite number > 0, got nan"),
    ("max_steps: 2.5\n", "--max_steps must be an integer >= 1, got 2.5"),
    ("recompute: 1\n", "--recompute must be true or false, got 1"),
    ("tokenizer_path: 5\n", "--tokenizer_path must be a string, got 5"),
    ("learning_rate: 1.0e-5\n", "unknown options ['learning_rate']"),
    ("- lr\n", "must hold a mapping of option: value"),
    ("lr: [1\n", "is not valid YAML"),
])
def test_config_values_are_checked_like_options(capsys, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    argv = ["--config", str(tmp_path / "c.yaml"), "--model_path", "m", "--data_path", "d"]
    assert message in fails(capsys, argv)


def test_data_is_checked_whole_before_the_model_loads(capsys, tmp_path, t2i_data):
    argv = ["--model_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "out")]
    assert f"{t2i_data} holds T2I data but --task is vqa" in fails(capsys, argv + ["--data_path", str(t2i_data),
                                                                                   "--task", "vqa"])
    vqa = make_data(tmp_path / "vqa", [{"name": "q", "images": grid(0, 2, 2), "texts": "Q?", "response": "A."}])
    assert f"{vqa} holds VQA data but --task is t2i" in fails(capsys, argv + ["--data_path", str(vqa)])

    # one damaged and one missing file among good ones: all named at the start, not at their step
    samples = [{"name": f"s{i}", "images": grid(i, 2, 2), "texts": "t"} for i in range(4)]
    data = make_data(tmp_path / "mixed", samples)
    (data / "feature" / "s1.npz").write_bytes(b"PK\x03\x04 cut short")
    (data / "feature" / "s3.npz").unlink()
    err = fails(capsys, argv + ["--data_path", str(data)])
    assert "2 of 4 feature files" in err and "s1.npz: unreadable" in err and "s3.npz: missing" in err
    np.savez(data / "feature" / "s1.npz", name=np.array("s1"), images=np.full((2, 2), 40000), texts=np.array("t"))
    (data / "list" / "train.json").write_text(json.dumps({"prefix": "feature", "path_list": ["s0.npz", "s1.npz"]}))
    assert "s1.npz: images holds codes outside [0, 32768)" in fails(capsys, argv + ["--data_path", str(data)])
    (data / "list" / "train.json").write_text("{")
    assert "train.json is not a data listing" in fails(capsys, argv + ["--data_path", str(data)])


def test_an_unwritable_output_directory_is_found_before_the_model_loads(capsys, tmp_path, t2i_data):
    (tmp_path / "file").write_text("")
    err = fails(capsys, ["--model_path", str(tmp_path / "no_model"), "--data_path", str(t2i_data),
                         "--output_dir", str(tmp_path / "file" / "out")])
    assert "Not a directory" in err and str(tmp_path / "file") in err


def test_non_finite_loss_stops_the_run_and_no_nan_is_saved(capsys, tmp_path, t2i_data):
    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    # Adam moves every weight by about lr per step: 1e30 makes the second forward overflow
    argv = ["--model_path", str(model_dir), "--data_path", str(t2i_data), "--output_dir", str(out),
            "--max_length", "20", "--max_steps", "3", "--lr", "1e30", "--save_steps", "1", "--max_grad_norm", "0"]
    err = fails(capsys, argv)
    assert "step 2: the gradients are not finite (loss scale 1); training stopped without applying or saving" in err
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-00000001"]
    for name, array in read_safetensors(checkpoint.rank_file(checkpoint.step_dir(out, 1), 0)).items():
        assert np.isfinite(array).all(), name
    assert not list(out.glob("checkpoints/*.tmp"))

    run = Run(parse_args(argv[:4] + ["--output_dir", str(tmp_path / "guard"), "--max_length", "20"]))
    with pytest.raises(ValueError, match="step 5: the loss is inf; training stopped"):
        run.stop_if_diverged({"step": 5, "loss": float("inf"), "overflow": False, "loss_scale": 1.0})
    # and a save of non-finite weights is refused outright
    weight = run.master[0]
    weight.set_data(weight * float("nan"))
    with pytest.raises(ValueError, match=r"step 0: \d+ weights are NaN or infinite; not saving them"):
        run.save()
    assert not (tmp_path / "guard" / "checkpoints").exists()


def test_merge_options_are_checked(capsys, tmp_path):
    err = fails(capsys, ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "m"), "--max_shard_gb", "nan"],
                merge_zero_shards.main)
    assert "--max_shard_gb must be a finite number > 0, got nan" in err
    err = fails(capsys, ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "m")], merge_zero_shards.main)
    assert "is neither a checkpoint" in err
