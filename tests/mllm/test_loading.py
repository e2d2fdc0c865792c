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
              "vocabulary_map": {"<|image token|>": 151851, "<|image start|>": 151852, "<|image end|>": 151853,
                                 "<|extra_200|>": 151846, "<|extra_201|>": 151847}}
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
    assert (loaded.config.img_token_id, loaded.config.boi_token_id, loaded.config.eoi_token_id,
            loaded.config.eol_token_id, loaded.config.eof_token_id) == (151851, 151852, 151853, 151846, 151847)
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


def _edited_config(tmp_path, edit):
    """A saved tiny checkpoint whose config.json was changed by `edit(config)`."""
    d = _saved(tmp_path, shard=False)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_key_value_heads", "rope_theta", "eos_token_id",
                                 "img_token_id", "image_area"])
def test_a_required_key_is_never_defaulted(tmp_path, key):
    d = _edited_config(tmp_path, lambda c: c.pop(key))
    with pytest.raises(weights.WeightsError, match=rf"{d}/config.json lacks required keys \['{key}'\]"):
        Emu3ForCausalLM.from_pretrained(d)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "64", r"hidden_size must be an integer >= 1, got '64'"),
    ("hidden_size", 64.0, r"hidden_size must be an integer >= 1, got 64.0"),
    ("num_hidden_layers", True, r"num_hidden_layers must be an integer >= 1, got True"),
    ("num_hidden_layers", 0, r"num_hidden_layers must be an integer >= 1, got 0"),
    ("rms_norm_eps", float("nan"), r"rms_norm_eps must be a finite number > 0, got nan"),
    ("rope_theta", float("inf"), r"rope_theta must be a finite number > 0, got inf"),
    ("attention_dropout", 1.0, r"attention_dropout must be a finite number in \[0, 1\), got 1.0"),
    ("eos_token_id", 512, r"eos_token_id must be an integer in \[0, 511\], got 512"),
    ("pad_token_id", -1, r"pad_token_id must be an integer in \[0, 511\], got -1"),
    ("use_cache", "yes", r"use_cache must be true or false, got 'yes'"),
    ("rope_scaling", {"type": "linear", "factor": float("nan")}, r"linear rope_scaling's factor must be a finite"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, key, value, message):
    d = _edited_config(tmp_path, lambda c: c.__setitem__(key, value))
    with pytest.raises(weights.WeightsError, match=rf"{d}/config.json: {message}"):
        Emu3ForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match=message):
        tiny_model(**{key: value})


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"]),
     r"describes another model \(model_type 'llama', architectures \['LlamaForCausalLM'\]\)"),
    (lambda c: c.update(architectures=["Emu3VisionVQModel"]), r"describes another model"),
    (lambda c: c.update(model_type="Emu3VisionVQ"), r"describes another model \(model_type 'Emu3VisionVQ'"),
])
def test_a_config_of_another_model_is_refused(tmp_path, edit, message):
    d = _edited_config(tmp_path, edit)
    with pytest.raises(weights.WeightsError, match=rf"{d}/config.json {message}"):
        Emu3ForCausalLM.from_pretrained(d)


def test_hf_config_needs_its_shape_keys_and_image_tokens(tmp_path):
    model = tiny_model()
    _write_hf_checkpoint(model, tmp_path, old_names=False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vocabulary_map"]["<|image end|>"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match=r"\(vocabulary_map\) lacks required keys \['<\|image end\|>'\]"):
        Emu3ForCausalLM.from_pretrained(tmp_path)
    config["vocabulary_map"]["<|image end|>"] = 151853
    del config["text_config"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match=r"\(text_config\) lacks required keys \['hidden_size'\]"):
        Emu3ForCausalLM.from_pretrained(tmp_path)


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
