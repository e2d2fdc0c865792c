"""Checkpoint layouts of the vision tokenizer: BAAI's original and transformers' "-hf".

Our cells carry BAAI's module names, so the original layout differs from our parameter names only
in MindSpore's parameter suffixes (GroupNorm/BatchNorm gamma/beta/moving_*, Embedding
embedding_table). transformers' `Emu3VQVAE` renames modules (down -> down_block.down,
mid -> middle_block, attention norms moved out of the attention block, q/k/v/proj_out ->
q_proj/k_proj/v_proj/out_proj as Linear, i.e. without the 1x1 kernel dims), and a full Emu3 "-hf"
checkpoint prefixes all of it with `model.vqmodel.` (older conversions: `vqmodel.`).
"""

import re

import numpy as np

from emu3 import weights
from emu3.tokenizer.config import METADATA_KEYS, Emu3VisionVQConfig
from emu3.weights import CONFIG_FILE, WeightsError

# MindSpore parameter suffix -> PyTorch's.
_MS_SUFFIXES = (
    (".bn2d.moving_mean", ".running_mean"),
    (".bn2d.moving_variance", ".running_var"),
    (".bn2d.gamma", ".weight"),
    (".bn2d.beta", ".bias"),
    (".embedding_table", ".weight"),
    (".gamma", ".weight"),
    (".beta", ".bias"),
)

# Original -> transformers module renames, applied in order.
_HF_RENAMES = (
    (r"\.q\.", ".q_proj."),
    (r"\.k\.", ".k_proj."),
    (r"\.v\.", ".v_proj."),
    (r"\.proj_out\.", ".out_proj."),
    (r"mid\.attn_1\.norm\.", "mid.attn_norm."),
    (r"\.attn\.(\d+)\.norm\.", r".attn_norms.\1."),
    (r"\.down\.", ".down_block.down."),
    (r"\.up\.", ".up_block.up."),
    (r"\.mid\.", ".middle_block."),
)
_HF_PREFIXES = ("model.vqmodel.", "vqmodel.")
_HF_MARKERS = (".down_block.", ".middle_block.", ".up_block.")
_ATTN_PROJ = re.compile(r"\.(q|k|v|proj_out)\.weight$")

# transformers' Emu3VQVAEConfig keys -> BAAI's; its defaults equal BAAI's.
_HF_CONFIG_KEYS = {
    "codebook_size": "codebook_size", "embed_dim": "embed_dim", "latent_channels": "z_channels",
    "double_latent": "double_z", "in_channels": "in_channels", "out_channels": "out_channels",
    "temporal_downsample_factor": "temporal_downsample_factor", "base_channels": "ch",
    "channel_multiplier": "ch_mult", "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions", "attention_dropout": "dropout",
}
_HF_ATTENTION_KEYS = ("hidden_size", "num_attention_heads")


def original_name(param_name: str) -> str:
    for ms_suffix, pt_suffix in _MS_SUFFIXES:
        if param_name.endswith(ms_suffix):
            return param_name[: -len(ms_suffix)] + pt_suffix
    return param_name


def hf_name(original: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        original = re.sub(pattern, replacement, original)
    return original


def original_state_dict(model) -> dict[str, np.ndarray]:
    """The model's tensors under BAAI's names, with BatchNorm's num_batches_tracked as BAAI's files
    carry it (PyTorch bookkeeping, unused at inference; written as 0)."""
    tensors = {}
    for name, param in model.parameters_and_names():
        tensors[original_name(name)] = weights.to_numpy(param)
        if name.endswith(".bn2d.moving_mean"):
            tensors[name[: -len(".bn2d.moving_mean")] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return tensors


def _is_hf(names) -> bool:
    return any(marker in name for name in names for marker in _HF_MARKERS)


def _checkpoint_names(directory) -> list[str]:
    weight_map = weights.index_weight_map(directory)
    if weight_map is not None:
        return list(weight_map)
    return list(weights.read_safetensors(weights.weight_files(directory)[0]))


def load_weights(model, directory) -> None:
    """Load a checkpoint in either layout into `model`, strictly (WeightsError on any mismatch)."""
    names = _checkpoint_names(directory)
    params = [name for name, _ in model.parameters_and_names()]
    if _is_hf(names):
        file_to_param = {hf_name(original_name(p)): p for p in params}
        prefix = next((p for p in _HF_PREFIXES if any(n.startswith(p) for n in names)), "")
    else:
        file_to_param = {original_name(p): p for p in params}
        prefix = ""

    def rename(file_name):
        if not file_name.startswith(prefix):
            return None  # the language model's tensors in a full Emu3 "-hf" checkpoint
        name = file_name[len(prefix):]
        if name.endswith(".num_batches_tracked"):
            return None
        return file_to_param.get(name, file_name)

    def transform(param_name, array):
        # transformers stores the 1x1-conv attention projections as Linear weights.
        if _ATTN_PROJ.search(param_name) and array.ndim == 2:
            return array.reshape(array.shape + (1, 1))
        return array

    weights.load_into(model, directory, rename, transform)


def read_config(directory) -> Emu3VisionVQConfig:
    """The config of a checkpoint directory: BAAI's keys, a transformers Emu3VQVAEConfig, or a full
    Emu3 "-hf" config (whose `vq_config` is used)."""
    raw = weights.read_config(directory)
    source = f"{directory}/{CONFIG_FILE}"
    if "vq_config" in raw:
        # A full Emu3 config: its vq_config may carry every generic PretrainedConfig attribute,
        # so only the architecture keys are read from it.
        return _from_hf(raw["vq_config"], f"{source} (vq_config)", strict=False)
    if raw.get("model_type") == "emu3_vqgan" or "base_channels" in raw:
        return _from_hf(raw, source, strict=True)
    return Emu3VisionVQConfig.from_dict(raw, source)


def _from_hf(raw: dict, source: str, strict: bool) -> Emu3VisionVQConfig:
    if strict:
        unknown = sorted(set(raw) - set(_HF_CONFIG_KEYS) - set(_HF_ATTENTION_KEYS) - METADATA_KEYS)
        if unknown:
            raise WeightsError(
                f"{source} is not a transformers Emu3VQVAEConfig: unknown keys {unknown}. Expected keys "
                f"from {sorted(_HF_CONFIG_KEYS) + list(_HF_ATTENTION_KEYS)}"
            )
    values = {ours: raw[theirs] for theirs, ours in _HF_CONFIG_KEYS.items() if theirs in raw}
    try:
        config = Emu3VisionVQConfig(**values)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{source}: {err}") from None
    heads = raw.get("num_attention_heads", 1)
    width = config.ch * config.ch_mult[-1]
    if heads != 1 or raw.get("hidden_size", width) != width:
        raise WeightsError(
            f"{source}: Emu3's tokenizer uses single-head attention of width ch*ch_mult[-1] = {width}; "
            f"got num_attention_heads={heads}, hidden_size={raw.get('hidden_size')}"
        )
    return config
