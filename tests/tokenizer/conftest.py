"""A tiny random Emu3 VQ in PyTorch (transformers' Emu3VQVAE, the reference), written to disk in
both checkpoint layouts: transformers' own (save_pretrained) and BAAI's original names."""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

TINY = dict(base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3],
            hidden_size=32, codebook_size=512, embed_dim=4, latent_channels=4, temporal_downsample_factor=4)

# transformers -> BAAI names, written independently of emu3.tokenizer.layouts (the inverse of
# transformers' convert_emu3_weights_to_hf.py).
_TO_ORIGINAL = (
    (r"\.down_block\.down\.", ".down."),
    (r"\.up_block\.up\.", ".up."),
    (r"\.middle_block\.attn_norm\.", ".mid.attn_1.norm."),
    (r"\.middle_block\.", ".mid."),
    (r"\.attn_norms\.(\d+)\.", r".attn.\1.norm."),
    (r"\.q_proj\.", ".q."),
    (r"\.k_proj\.", ".k."),
    (r"\.v_proj\.", ".v."),
    (r"\.out_proj\.", ".proj_out."),
)


def to_original_layout(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        for pattern, repl in _TO_ORIGINAL:
            name = re.sub(pattern, repl, name)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", name):
            value = value.reshape(value.shape + (1, 1))
        out[name] = value
    return out


def original_config() -> dict:
    return {
        "architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ",
        "codebook_size": TINY["codebook_size"], "embed_dim": TINY["embed_dim"], "z_channels": TINY["latent_channels"],
        "double_z": False, "in_channels": 3, "out_channels": 3, "temporal_downsample_factor": 4,
        "ch": TINY["base_channels"], "ch_mult": TINY["channel_multiplier"], "num_res_blocks": TINY["num_res_blocks"],
        "attn_resolutions": TINY["attn_resolutions"], "dropout": 0.0,
    }


@pytest.fixture(scope="session")
def reference_vq(torch_reference):
    """transformers' Emu3VQVAE with random weights, random norm affines, random BatchNorm running
    statistics and a codebook on the latents' scale."""
    torch = torch_reference
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    model = Emu3VQVAE(Emu3VQVAEConfig(**TINY)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
        model.quantize.embedding.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="session")
def vq_dirs(reference_vq, tmp_path_factory):
    """{"hf": dir, "original": dir, "full_hf": dir} holding the reference's weights."""
    root = tmp_path_factory.mktemp("vq")
    hf = root / "hf"
    reference_vq.save_pretrained(hf, safe_serialization=True)
    state = {k: v.detach().numpy().copy() for k, v in reference_vq.state_dict().items()}

    original = root / "original"
    original.mkdir()
    save_file(to_original_layout(state), str(original / "model.safetensors"))
    (original / "config.json").write_text(json.dumps(original_config()))

    # A full Emu3 "-hf" checkpoint: the VQ under model.vqmodel., next to the language model.
    full = root / "full_hf"
    full.mkdir()
    tensors = {f"model.vqmodel.{k}": v for k, v in state.items()}
    tensors["model.text_model.embed_tokens.weight"] = np.zeros((8, 4), np.float32)
    tensors["lm_head.weight"] = np.zeros((8, 4), np.float32)
    save_file(tensors, str(full / "model.safetensors"))
    vq_config = json.loads((hf / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({"model_type": "emu3", "vq_config": vq_config,
                                                   "text_config": {"hidden_size": 4}}))
    return {"hf": hf, "original": original, "full_hf": full}
