"""Checkpoints: BAAI's original layout (single file, shards), the transformers -hf layout, errors."""

import json

import numpy as np
import mindspore as ms
import pytest

from emu3 import weights
from emu3.mllm import Emu3Config, Emu3ForCausalLM
from emu3.mllm import layouts
from tests.mllm.tiny import tiny_model


def _params(model):
    return {n: p.asnumpy() for n, p in model.parameters_and_names()}


def _assert_same_weights(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_sharded_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / weights.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(_params(model))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Emu3ForCausalLM"] and config["vocab_size"] == 512
    loaded = Emu3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    _assert_same_weights(loaded, model)


def test_single_file_round_trip_and_fp16_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / weights.SINGLE_FILE).is_file() and not (tmp_path / weights.INDEX_FILE).exists()
    _assert_same_weights(Emu3ForCausalLM.from_pretrained(tmp_path), model)
    half = Emu3ForCausalLM.from_pretrained(tmp_path, dtype="fp16")
    assert all(p.dtype == ms.float16 for p in half.get_parameters())
    ids = ms.Tensor(np.arange(3, 13)[None], ms.int32)
    logits16, logits32 = half(ids), model(ids)
    assert logits16.dtype == ms.float32  # logits are fp32 whatever the weights
    assert np.abs(logits16.asnumpy() - logits32.asnumpy()).max() < 2e-2


def test_a_fused_model_saves_baai_layout_and_loads_back(tmp_path):
    model = tiny_model()
    split = _params(model)
    model.fuse_projections()
    names = set(_params(model))
    assert "model.layers.1.self_attn.qkv_proj.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".up_proj." in n for n in names)
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / weights.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(split)  # BAAI's names only
    loaded = Emu3ForCausalLM.from_pretrained(tmp_path)
    for name, value in _params(loaded).items():
        np.testing.assert_array_equal(value, split[name], err_msg=name)


def _write_hf_checkpoint(model, directory, old_names):
    """The model as transformers' Emu3ForConditionalGeneration files: nested config, vq tensors."""
    c = model.config.to_dict()
    text = {k: v for k, v in c.items() if k not in ("architectures", "model_type", "img_token_id", "boi_token_id",
                                                     "eoi_token_id", "eol_token_id", "eof_token_id", "image_area",
                                                     "pretraining_tp")}
    config = {"architectures": ["Emu3ForConditionalGeneration"], "model_type": "emu3",
              "text_config": {**text, "model_type": "emu3_text_model"}, "vq_config": {"embed_dim": 4},
              "vocabulary_map": {"<|image token|>": 151851, "<|image start|>": 151852, "<|extra_200|>": 151846}}
    tensors = {}
    for name, arr in _params(model).items():
        hf = layouts.to_hf_name(name)
        if old_names:
            hf = "text_model.lm_head.weight" if hf == "lm_head.weight" else "text_model.model." + name[len("model."):]
        tensors[hf] = arr
    vq_prefix = "vqmodel." if old_names else "model.vqmodel."
    tensors[vq_prefix + "quantize.embedding.weight"] = np.zeros((8, 4), np.float32)
    weights.write_checkpoint(tensors, directory, config, max_shard_bytes=80_000)


@pytest.mark.parametrize("old_names", [False, True])
def test_hf_layout_loads_the_same_model(tmp_path, old_names):
    model = tiny_model()
    _write_hf_checkpoint(model, tmp_path, old_names)
    loaded = Emu3ForCausalLM.from_pretrained(tmp_path)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size", "rope_theta"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    assert loaded.config.img_token_id == 151851 and loaded.config.eol_token_id == 151846
    _assert_same_weights(loaded, model)


def test_config_round_trip_and_bad_values():
    config = Emu3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert Emu3Config.from_dict(config.to_dict()) == config
    assert config.head_dim == 16 and config.vocab_size == 184622 and config.rope_theta == 1e6
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Emu3Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="unknown keys"):
        Emu3Config(hiden_size=3)
    assert Emu3Config.from_dict({**config.to_dict(), "output_hidden_states": False}) == config
    with pytest.raises(ValueError, match="rope_scaling"):
        Emu3Config(rope_scaling={"type": "yarn", "factor": 2.0})


def _saved(tmp_path, shard=True):
    tiny_model().save_pretrained(tmp_path, max_shard_bytes=60_000 if shard else None)
    return tmp_path


def _rewrite_single(directory, edit):
    path = directory / weights.SINGLE_FILE
    tensors = {k: np.array(v) for k, v in weights.read_safetensors(path).items()}
    edit(tensors)
    weights.write_safetensors(tensors, path)


def test_missing_tensor_is_named(tmp_path):
    d = _saved(tmp_path, shard=False)
    _rewrite_single(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(weights.WeightsError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        Emu3ForCausalLM.from_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _saved(tmp_path, shard=False)
    _rewrite_single(d, lambda t: t.__setitem__("model.layers.7.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(weights.WeightsError, match=r"unexpected tensors \(1\): model.layers.7.extra.weight"):
        Emu3ForCausalLM.from_pretrained(d)


def test_wrongly_shaped_tensor_is_named(tmp_path):
    d = _saved(tmp_path, shard=False)
    _rewrite_single(d, lambda t: t.__setitem__("model.norm.weight", np.ones(32, np.float32)))
    with pytest.raises(weights.WeightsError, match=r"wrongly shaped tensors \(1\): model.norm.weight \(32,\) "
                                                   r"vs expected \(64,\)"):
        Emu3ForCausalLM.from_pretrained(d)


def test_config_that_does_not_match_the_weights(tmp_path):
    d = _saved(tmp_path, shard=False)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match=r"wrongly shaped tensors \(6\)"):
        Emu3ForCausalLM.from_pretrained(d)


def test_truncated_shard_is_reported(tmp_path):
    d = _saved(tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(weights.WeightsError, match=rf"{shard.name} is truncated"):
        Emu3ForCausalLM.from_pretrained(d)


def test_index_pointing_to_a_missing_shard_is_reported(tmp_path):
    d = _saved(tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(weights.WeightsError, match=rf"missing shards \(1\): {shard.name}"):
        Emu3ForCausalLM.from_pretrained(d)


def test_index_entry_absent_from_its_shard_is_reported(tmp_path):
    d = _saved(tmp_path)
    index_path = d / weights.INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = sorted(set(index["weight_map"].values()))[-1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(weights.WeightsError, match=r"absent \(1\): model.layers.0.mlp.gate_proj.weight"):
        Emu3ForCausalLM.from_pretrained(d)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(weights.WeightsError, match="does not exist"):
        Emu3ForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(weights.WeightsError, match="config.json is missing"):
        Emu3ForCausalLM.from_pretrained(tmp_path)
