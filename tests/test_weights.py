"""Checkpoint files: safetensors interoperability, sharding, strict loading errors, whole writes."""

import errno
import json

import ml_dtypes
import mindspore as ms
import numpy as np
import pytest
import safetensors.numpy
from mindspore import nn

from emu3 import weights
from emu3.weights import WeightsError
from tests import tmpfs


class TwoLayers(nn.Cell):
    def __init__(self):
        super().__init__()
        self.first = nn.Dense(4, 3)
        self.second = nn.Dense(3, 2, has_bias=False)


def _tensors(rng):
    return {
        "first.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "first.bias": rng.standard_normal(3).astype(np.float32),
        "second.weight": rng.standard_normal((2, 3)).astype(np.float32),
    }


def test_files_are_readable_by_the_safetensors_library_and_back(tmp_path, rng):
    tensors = _tensors(rng)
    tensors["half"] = rng.standard_normal((2, 2)).astype(np.float16)
    weights.write_safetensors(tensors, tmp_path / "a.safetensors")
    theirs = safetensors.numpy.load_file(str(tmp_path / "a.safetensors"))
    assert theirs.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(theirs[name], tensors[name])
    safetensors.numpy.save_file(tensors, str(tmp_path / "b.safetensors"))
    ours = weights.read_safetensors(tmp_path / "b.safetensors")
    for name in tensors:
        np.testing.assert_array_equal(ours[name], tensors[name])


def test_bf16_written_by_torch_is_read_exactly(tmp_path, torch_reference):
    torch = torch_reference
    import safetensors.torch

    t = torch.randn(3, 5).to(torch.bfloat16)
    safetensors.torch.save_file({"w": t}, str(tmp_path / "bf16.safetensors"))
    arr = weights.read_safetensors(tmp_path / "bf16.safetensors")["w"]
    assert arr.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arr.astype(np.float32), t.float().numpy())


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, rng):
    tensors = _tensors(rng)
    weights.write_checkpoint(tensors, tmp_path / "one", {"k": 1})
    weights.write_checkpoint(tensors, tmp_path / "many", {"k": 1}, max_shard_bytes=30)
    assert len(weights.weight_files(tmp_path / "many")) == 3
    assert weights.read_config(tmp_path / "many") == {"k": 1}
    for d in ("one", "many"):
        net = TwoLayers()
        weights.load_into(net, tmp_path / d, lambda n: n)
        for name, param in net.parameters_and_names():
            np.testing.assert_array_equal(param.asnumpy(), tensors[name])


def test_load_casts_to_the_parameter_dtype(tmp_path, rng):
    tensors = _tensors(rng)
    weights.write_checkpoint(tensors, tmp_path, {})
    net = TwoLayers()
    for _, p in net.parameters_and_names():
        p.set_dtype(ms.float16)
    weights.load_into(net, tmp_path, lambda n: n)
    got = dict(net.parameters_and_names())["first.weight"]
    assert got.dtype == ms.float16
    np.testing.assert_array_equal(got.asnumpy(), tensors["first.weight"].astype(np.float16))


def test_mismatches_are_all_listed(tmp_path, rng):
    tensors = _tensors(rng)
    del tensors["first.bias"]
    tensors["second.weight"] = np.zeros((3, 3), np.float32)
    tensors["stray.weight"] = np.zeros(1, np.float32)
    weights.write_checkpoint(tensors, tmp_path, {})
    with pytest.raises(WeightsError) as err:
        weights.load_into(TwoLayers(), tmp_path, lambda n: n)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "missing tensors (2): first.bias, second.weight" in msg
    assert "unexpected tensors (1): stray.weight" in msg
    assert "second.weight (3, 3) vs expected (2, 3)" in msg


def test_renamed_away_tensors_are_skipped(tmp_path, rng):
    tensors = _tensors(rng)
    tensors["ignored.num_batches_tracked"] = np.zeros((), np.int64)
    weights.write_checkpoint(tensors, tmp_path, {})
    weights.load_into(TwoLayers(), tmp_path, lambda n: None if n.startswith("ignored") else n)


def test_broken_directories_name_the_problem(tmp_path, rng):
    with pytest.raises(WeightsError, match="does not exist"):
        weights.weight_files(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="config.json is missing"):
        weights.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(WeightsError, match="not valid JSON"):
        weights.read_config(tmp_path)
    with pytest.raises(WeightsError, match="neither model.safetensors nor"):
        weights.weight_files(tmp_path)


def test_truncated_shard_is_reported(tmp_path, rng):
    weights.write_checkpoint(_tensors(rng), tmp_path, {})
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="model.safetensors is truncated: tensor"):
        weights.load_into(TwoLayers(), tmp_path, lambda n: n)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WeightsError, match="too short"):
        weights.read_safetensors(path)


def test_index_problems_are_reported(tmp_path, rng):
    weights.write_checkpoint(_tensors(rng), tmp_path, {}, max_shard_bytes=30)
    index_path = tmp_path / weights.INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.weight"] = index["weight_map"]["first.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="(?s)lacks tensors .* absent \\(1\\): extra.weight"):
        weights.load_into(TwoLayers(), tmp_path, lambda n: n)
    index["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="shard files that do not exist"):
        weights.weight_files(tmp_path)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    with weights.atomic_open(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with weights.atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping its data bytes."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["first.weight"].update(shape=[4, 4]),
     r"tensor 'first.weight' of shape \[4, 4\] and dtype F32 needs 64 bytes, its data_offsets give 48"),
    (lambda h: h["first.bias"].update(shape=[1]), r"tensor 'first.bias' of shape \[1\] .* needs 4 bytes"),
    (lambda h: h["second.weight"].update(shape="2x3"), r"tensor 'second.weight' has a malformed header entry"),
    (lambda h: h["first.bias"].update(data_offsets=[12, 0]), r"tensor 'first.bias' has a malformed header entry"),
    (lambda h: h["first.bias"].update(dtype="F8"), r"tensor 'first.bias' has unsupported dtype F8"),
])
def test_a_header_that_does_not_match_its_data_names_the_tensor(tmp_path, rng, edit, message):
    weights.write_checkpoint(_tensors(rng), tmp_path, {})
    path = tmp_path / weights.SINGLE_FILE
    _rewrite_header(path, edit)
    with pytest.raises(WeightsError, match=rf"{path}: {message}"):
        weights.read_safetensors(path)
    with pytest.raises(WeightsError, match=message):
        weights.load_into(TwoLayers(), tmp_path, lambda n: n)


def test_json_problems_name_the_file(tmp_path, rng):
    weights.write_checkpoint(_tensors(rng), tmp_path, {}, max_shard_bytes=30)
    index = tmp_path / weights.INDEX_FILE
    index.write_text('{"weight_map": {"first.weight": ')
    for call in (weights.weight_files, weights.index_weight_map,
                 lambda d: weights.load_into(TwoLayers(), d, lambda n: n)):
        with pytest.raises(WeightsError, match=rf"{index} is not valid JSON"):
            call(tmp_path)
    index.write_text('{"weight_map": ["model-00001-of-00003.safetensors"]}')
    with pytest.raises(WeightsError, match=rf"{index} is not a valid safetensors index: it needs a \"weight_map\""):
        weights.weight_files(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match=r"config.json must hold a JSON object .*, got list"):
        weights.read_config(tmp_path)


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "answers.jsonl"
    with weights.atomic_open(path) as first:
        first.write(b"first writer, " * 100)
        with weights.atomic_open(path) as second:
            second.write(b"second writer")
            temporaries = sorted(p.name for p in tmp_path.iterdir())
            assert len(temporaries) == 2 and all(n.startswith("answers.jsonl.") and n.endswith(".tmp")
                                                 for n in temporaries)
        assert path.read_bytes() == b"second writer"
        first.write(b"done")
    # The last rename wins, and what it put there is that writer's whole file.
    assert path.read_bytes() == b"first writer, " * 100 + b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_a_full_disk_leaves_the_previous_file_whole(tmp_path):
    with tmpfs.mounted(tmp_path / "disk", size_kib=64) as disk:
        path = disk / "generation.json"
        with weights.atomic_open(path, "w") as f:
            f.write("previous run\n")
        tmpfs.fill(disk)
        with pytest.raises(OSError) as failure:
            with weights.atomic_open(path, "w") as f:
                f.write("x" * 100_000)
        assert failure.value.errno == errno.ENOSPC
        assert path.read_text() == "previous run\n"
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "generation.json"]
