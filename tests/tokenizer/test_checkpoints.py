"""Loading both layouts, saving BAAI's, and the errors a bad checkpoint directory gives."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQModel
from emu3.weights import WeightsError


def _params(model):
    return {name: p.asnumpy() for name, p in model.parameters_and_names()}


@pytest.fixture(scope="module")
def loaded(vq_dirs):
    return {layout: Emu3VisionVQModel.from_pretrained(path) for layout, path in vq_dirs.items()}


def test_all_layouts_load_the_same_model(loaded, vq_dirs, reference_vq):
    original = _params(loaded["original"])
    for layout in ("hf", "full_hf"):
        other = _params(loaded[layout])
        assert other.keys() == original.keys()
        for name in original:
            np.testing.assert_array_equal(other[name], original[name], err_msg=f"{layout}: {name}")
    # The values are the reference's (spot checks across the renames).
    ref = reference_vq.state_dict()
    np.testing.assert_array_equal(original["encoder.mid.attn_1.q.weight"][:, :, 0, 0],
                                  ref["encoder.middle_block.attn_1.q_proj.weight"].numpy())
    np.testing.assert_array_equal(original["decoder.time_res_stack.0.norm1.bn2d.moving_variance"],
                                  ref["decoder.time_res_stack.0.norm1.running_var"].numpy())
    assert loaded["hf"].config == loaded["original"].config == loaded["full_hf"].config
    assert Emu3VisionVQConfig.from_pretrained(vq_dirs["hf"]) == loaded["original"].config


def test_save_pretrained_writes_baai_layout_and_round_trips(loaded, vq_dirs, tmp_path):
    model = loaded["hf"]
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    baai = load_file(str(vq_dirs["original"] / "model.safetensors"))
    # Same names and shapes as BAAI's files (num_batches_tracked included), and the same values.
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in baai.items()}
    for name in baai:
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(saved[name], baai[name], err_msg=name)
    for name in ("encoder.down.3.attn.0.q.weight", "decoder.mid.block_1.norm1.conv_y.weight",
                 "encoder.time_conv.0.conv.conv.weight", "encoder.time_res_stack.1.norm1.num_batches_tracked"
                 if model.config.num_res_blocks > 1 else "encoder.time_res_stack.0.norm1.num_batches_tracked",
                 "quantize.embedding.weight", "quant_conv.conv.weight"):
        assert name in saved, name
    config = json.loads((tmp_path / "config.json").read_text())
    assert Emu3VisionVQConfig.from_dict(config) == model.config

    reloaded = Emu3VisionVQModel.from_pretrained(tmp_path)
    before, after = _params(model), _params(reloaded)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        Emu3VisionVQModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="config.json is missing"):
        Emu3VisionVQModel.from_pretrained(tmp_path / "empty")


def test_config_with_unknown_or_missing_keys(vq_dirs, tmp_path):
    bad = _copy(vq_dirs["original"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["channels"] = 3
    del config["ch_mult"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config.json.*unknown keys \['channels'\].*missing keys \['ch_mult'\]"):
        Emu3VisionVQModel.from_pretrained(bad)

    hf = _copy(vq_dirs["hf"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_attention_heads"] = 2
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="single-head attention"):
        Emu3VisionVQModel.from_pretrained(hf)
    config["num_attention_heads"] = 1
    config["base_chanels"] = 32
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"unknown keys \['base_chanels'\]"):
        Emu3VisionVQModel.from_pretrained(hf)


@pytest.mark.parametrize("key, value, message", [
    ("ch", "256", r"ch must be an integer >= 1, got '256'"),
    ("codebook_size", 512.0, r"codebook_size must be an integer >= 1, got 512.0"),
    ("num_res_blocks", 0, r"num_res_blocks must be an integer >= 1, got 0"),
    ("ch_mult", [1, "2", 2, 4], r"every entry of ch_mult must be an integer >= 1, got '2'"),
    ("ch_mult", 4, r"ch_mult must be a list of integers, got 4"),
    ("dropout", float("nan"), r"dropout must be a finite number in \[0, 1\), got nan"),
    ("double_z", "false", r"double_z must be true or false, got 'false'"),
    ("model_type", "Emu3", r"describes another model \(model_type 'Emu3'\), not Emu3's vision tokenizer"),
])
def test_config_values_of_the_wrong_type_or_model_are_refused(vq_dirs, tmp_path, key, value, message):
    bad = _copy(vq_dirs["original"], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=rf"{bad}/config.json.*{message}"):
        Emu3VisionVQModel.from_pretrained(bad)


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_missing_unexpected_and_misshaped_tensors(vq_dirs, tmp_path, layout):
    bad = _copy(vq_dirs[layout], tmp_path / "bad")
    tensors = dict(load_file(str(bad / "model.safetensors")))
    gone = next(k for k in tensors if k.endswith("conv_out.bias"))
    del tensors[gone]
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["quantize.embedding.weight"] = np.zeros((7, 4), np.float32)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(WeightsError) as err:
        Emu3VisionVQModel.from_pretrained(bad)
    message = str(err.value)
    assert "model.safetensors" in message
    assert "missing tensors" in message and "conv_out.bias" in message
    assert "unexpected tensors (1): encoder.extra.weight" in message
    assert "quantize.embedding.weight (7, 4) vs expected (512, 4)" in message
