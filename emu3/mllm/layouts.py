"""Weight-name layouts of Emu3 language-model checkpoints.

Our parameter names are BAAI's original ones (`model.layers.N.self_attn.q_proj.weight`,
`lm_head.weight`, ...). transformers' "-hf" conversions (Emu3ForConditionalGeneration) keep the
text model under `model.text_model.` (older files: `text_model.model.`), the head as `lm_head`
(older: `text_model.lm_head`), and also hold the vision tokenizer (`model.vqmodel.`/`vqmodel.`),
which the language model does not load. Tensor shapes are the same in both layouts.

`Emu3ForCausalLM.fuse_projections()` stacks q/k/v_proj into one qkv_proj and gate/up_proj into one
gate_up_proj (by output rows) for inference; checkpoints never hold those: `split_fused` restores
BAAI's tensors before writing.
"""

from typing import Callable

import numpy as np

# A fused projection's name and the projections it stacks, in row order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

HF_TEXT_PREFIXES = ("model.text_model.", "text_model.model.")
HF_HEAD_NAMES = ("lm_head.weight", "text_model.lm_head.weight")
HF_VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")


def is_hf_config(config: dict) -> bool:
    """A transformers -hf config.json nests the language model's keys under text_config."""
    return "text_config" in config


def from_hf_name(name: str) -> str | None:
    """Our name for an -hf tensor name; None for the vision tokenizer's tensors."""
    if name.startswith(HF_VQ_PREFIXES):
        return None
    if name in HF_HEAD_NAMES:
        return "lm_head.weight"
    for prefix in HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name  # unknown: reported as unexpected by the loader


def to_hf_name(name: str) -> str:
    """The -hf name (current transformers spelling) of one of our parameter names."""
    if name == "lm_head.weight":
        return name
    return "model.text_model." + name[len("model."):]


def rename_for(config: dict) -> Callable[[str], str | None]:
    """The file-name -> parameter-name map for the checkpoint whose config.json is `config`."""
    return from_hf_name if is_hf_config(config) else (lambda name: name)


def _rows(projection: str, config) -> int:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads,
             "v_proj": config.num_key_value_heads}
    if projection in heads:
        return heads[projection] * config.head_dim
    return config.intermediate_size  # gate_proj, up_proj


def split_fused(tensors: dict, config) -> dict:
    """`tensors` (name: array) with every fused projection's weight replaced by the weights it
    stacks, under BAAI's names (`...self_attn.qkv_proj.weight` -> `...self_attn.q_proj.weight`, ...)."""
    out = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        parent, _, projection = module.rpartition(".")
        if projection not in FUSED:
            out[name] = value
            continue
        parts = FUSED[projection]
        bounds = np.cumsum([_rows(part, config) for part in parts])[:-1]
        for part, piece in zip(parts, np.split(value, bounds, 0)):
            out[f"{parent}.{part}.{leaf}"] = piece
    return out
