"""merge_zero_shards: ZeRO-3 shards joined back; rank files of another save or run refused; the
model the run started from and the checkpoint itself never written over; an existing model
directory replaced whole (an old index can never win) or refused."""

import json

import numpy as np
import pytest

from emu3.weights import INDEX_FILE, read_safetensors, weight_files, write_checkpoint, write_safetensors
from train import checkpoint
from train.merge_zero_shards import main, merge

FULL = np.arange(10, dtype=np.float32).reshape(5, 2)


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "base_model"
    write_checkpoint({"w": np.zeros((5, 2), np.float32)}, directory, {"hidden_size": 2})
    (directory / "emu3.tiktoken").write_text("vocabulary")
    return directory


def write_ckpt(run_dir, model_dir, step, run_id="run-a", world=2):
    """A ZeRO-3 checkpoint as `world` ranks save it: flat, zero-padded, equal shards of FULL."""
    directory = checkpoint.step_dir(run_dir, step)
    directory.mkdir(parents=True)
    flat = np.concatenate([FULL.reshape(-1), np.zeros(-FULL.size % world, np.float32)])
    for rank, shard in enumerate(np.split(flat, world)):
        write_safetensors({"w": shard, "optimizer.m.w": shard, checkpoint.STEP_KEY: np.array([step], np.int64),
                           checkpoint.RUN_KEY: np.frombuffer(run_id.encode(), np.uint8)},
                          checkpoint.rank_file(directory, rank))
    state = {"step": step, "run_id": run_id, "world_size": world, "sp_size": world, "zero_stage": 3,
             "full_shapes": {"w": [5, 2]}, "model_config": {"hidden_size": 2}, "model": str(model_dir),
             "args": {"task": "t2i", "model_path": str(model_dir)}}
    (directory / checkpoint.STATE_FILE).write_text(json.dumps(state))
    return directory


def test_merge_joins_the_shards_and_copies_the_tokenizer(tmp_path, model_dir):
    write_ckpt(tmp_path / "run", model_dir, 2)
    out = merge(tmp_path / "run", tmp_path / "merged")
    np.testing.assert_array_equal(read_safetensors(out / "model.safetensors")["w"], FULL)
    assert set(read_safetensors(out / "model.safetensors")) == {"w"}  # no optimizer state
    assert (out / "emu3.tiktoken").read_text() == "vocabulary"
    assert json.loads((out / "config.json").read_text()) == {"hidden_size": 2}


def test_rank_files_of_another_save_or_run_are_refused(tmp_path, model_dir, capsys):
    good = write_ckpt(tmp_path / "run", model_dir, 4)
    other_run = write_ckpt(tmp_path / "other", model_dir, 4, run_id="run-b")
    other_step = write_ckpt(tmp_path / "run", model_dir, 2)
    cases = [(other_run, "belongs to step 4 of run run-b, but"), (other_step, "belongs to step 2 of run run-a")]
    for source, message in cases:
        mixed = tmp_path / f"mixed_{source.parent.parent.name}_{source.name}"
        write_ckpt(mixed, model_dir, 4)
        checkpoint.rank_file(source, 1).replace(checkpoint.rank_file(checkpoint.step_dir(mixed, 4), 1))
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(mixed), "--output", str(tmp_path / "merged")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "mixes files of different saves" in err
    write_safetensors({"w": np.zeros(5, np.float32)}, checkpoint.rank_file(good, 2))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="rank files of a larger run"):
        merge(good, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built output left


def test_the_base_model_and_the_checkpoint_are_never_written_over(tmp_path, model_dir):
    directory = write_ckpt(tmp_path / "run", model_dir, 2)
    before = read_safetensors(model_dir / "model.safetensors")["w"].copy()
    with pytest.raises(ValueError, match="is the model the run was trained from"):
        merge(directory, model_dir, overwrite=True)
    np.testing.assert_array_equal(read_safetensors(model_dir / "model.safetensors")["w"], before)
    for target in (tmp_path / "run", directory, directory / "inside"):
        with pytest.raises(ValueError, match="would hold or replace the checkpoint"):
            merge(directory, target, overwrite=True)
    checkpoint.verify(directory)


def test_an_existing_model_directory_is_refused_or_replaced_whole(tmp_path, model_dir):
    write_ckpt(tmp_path / "run", model_dir, 2)
    out = tmp_path / "merged"
    # an older merge, sharded: an index that would win over a new single file
    write_checkpoint({"w": np.ones((5, 2), np.float32), "v": np.ones(7, np.float32)}, out, {"old": 1},
                     max_shard_bytes=40)
    assert (out / INDEX_FILE).is_file()
    with pytest.raises(ValueError, match="is not empty .*pass --overwrite to replace it whole"):
        merge(tmp_path / "run", out)
    merge(tmp_path / "run", out, overwrite=True)
    assert weight_files(out) == [out / "model.safetensors"] and not (out / INDEX_FILE).exists()
    np.testing.assert_array_equal(read_safetensors(out / "model.safetensors")["w"], FULL)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "emu3.tiktoken", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_damaged_latest_checkpoint_names_the_earlier_one(tmp_path, model_dir):
    write_ckpt(tmp_path / "run", model_dir, 2)
    latest = write_ckpt(tmp_path / "run", model_dir, 4)
    checkpoint.rank_file(latest, 1).unlink()
    with pytest.raises(ValueError, match=r"step-00000004 is damaged .*rank-00001.safetensors is missing.*"
                                         r"merge an earlier one: --checkpoint .*step-00000002"):
        merge(tmp_path / "run", tmp_path / "merged")
