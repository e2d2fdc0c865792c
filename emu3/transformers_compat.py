"""The transformers names BAAI's Emu3 scripts import, backed by this port, so that their call sequences
run with the imports changed and nothing else but the device and dtype constants:

    from emu3.transformers_compat import (AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                                          GenerationConfig, LogitsProcessorList, PrefixConstrainedLogitsProcessor,
                                          UnbatchedClassifierFreeGuidanceLogitsProcessor)
    from emu3.mllm import Emu3Processor

`from_pretrained` takes a directory, or a Hugging Face hub id already in the local cache (e.g. after
`huggingface-cli download BAAI/Emu3-Gen`; nothing is downloaded here), and transformers' loading
arguments:
- torch_dtype: a MindSpore dtype (`mindspore.bfloat16`, ...), "bfloat16"/"float16"/"float32", or
  "auto" (bf16 on Ascend, fp32 on the CPU);
- attn_implementation: "eager" or "flash_attention_2" (Ascend; on the CPU it falls back to eager);
- device_map: None, "auto", "cpu", "npu"/"npu:N"/"ascend": it must name the device MindSpore runs on
  (`emu3.backend.set_run_mode(mode, device)` chooses it); CUDA devices are refused;
- trust_remote_code: accepted and unused (this package is the model code).
The models come back in inference mode, as transformers' do (the language model with its q/k/v and
gate/up projections fused, as the inference commands load it; `save_pretrained` writes BAAI's layout).
"""

import json
import os
import re
from pathlib import Path

from emu3 import backend
from emu3.generation.hf_api import (GenerationConfig, LogitsProcessorList, PrefixConstrainedLogitsProcessor,
                                    UnbatchedClassifierFreeGuidanceLogitsProcessor)
from emu3.mllm.model import Emu3ForCausalLM
from emu3.mllm.tokenizer import Emu3Tokenizer
from emu3.tokenizer import Emu3VisionVQImageProcessor, Emu3VisionVQModel

__all__ = ["AutoImageProcessor", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig",
           "LogitsProcessorList", "PrefixConstrainedLogitsProcessor", "UnbatchedClassifierFreeGuidanceLogitsProcessor",
           "resolve_pretrained"]

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def hub_cache() -> Path:
    """Hugging Face's cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def resolve_pretrained(name) -> Path:
    """A directory as given, or the cached snapshot of a hub id like "BAAI/Emu3-Gen"."""
    path = Path(name)
    if path.is_dir():
        return path
    if _HUB_ID.fullmatch(str(name)):
        repo = hub_cache() / f"models--{str(name).replace('/', '--')}"
        ref = repo / "refs" / "main"
        snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        snapshot = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else (
            snapshots[0] if len(snapshots) == 1 else None)
        if snapshot is not None and snapshot.is_dir():
            return snapshot
    raise FileNotFoundError(
        f"{name!r} is neither a directory nor a model in the Hugging Face cache ({hub_cache()}): download it first "
        f"(e.g. `huggingface-cli download {name}`) or pass its directory")


def _dtype(torch_dtype) -> str:
    if torch_dtype is None or torch_dtype == "auto":
        return backend.default_dtype()
    name = str(torch_dtype).rsplit(".", 1)[-1].lower()
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    raise ValueError(f"torch_dtype must be a MindSpore float dtype, 'bfloat16', 'float16', 'float32' or 'auto'; "
                     f"got {torch_dtype!r}")


def _check_device(device_map) -> None:
    if device_map in (None, "auto"):
        return
    name = str(device_map).lower()
    wanted = "CPU" if name == "cpu" else "Ascend" if name == "ascend" or name.split(":")[0] == "npu" else None
    if wanted is None:
        raise ValueError(f"device_map={device_map!r}: this MindSpore port runs on 'cpu' or Ascend ('npu', 'npu:0', "
                         f"'ascend'); CUDA is not supported")
    if wanted != backend.device_target():
        raise ValueError(f"device_map={device_map!r} but MindSpore runs on {backend.device_target()}: choose the "
                         f"device with emu3.backend.set_run_mode(mode, {wanted!r}) before loading")


def _loading_arguments(kwargs: dict, allowed: tuple) -> dict:
    unknown = sorted(set(kwargs) - set(allowed) - {"trust_remote_code", "device_map"})
    if unknown:
        raise TypeError(f"from_pretrained got unsupported argument(s) {unknown}; supported: "
                        f"{sorted({*allowed, 'trust_remote_code', 'device_map'})}")
    _check_device(kwargs.get("device_map"))
    return kwargs


class AutoModelForCausalLM:
    """Emu3's language model (Emu3-Gen, Emu3-Chat, Emu3-Stage1 or a "-hf" conversion)."""

    @staticmethod
    def from_pretrained(name, **kwargs) -> Emu3ForCausalLM:
        kwargs = _loading_arguments(kwargs, ("torch_dtype", "attn_implementation"))
        attn = kwargs.get("attn_implementation") or backend.default_attn_implementation()
        model = Emu3ForCausalLM.from_pretrained(resolve_pretrained(name), dtype=_dtype(kwargs.get("torch_dtype")),
                                                attn_implementation=attn)
        # Fused q/k/v and gate/up projections, as the inference commands load the model;
        # save_pretrained still writes BAAI's layout.
        return model.fuse_projections().eval()


class AutoModel:
    """Emu3's vision tokenizer (Emu3-VisionTokenizer), what BAAI's scripts load with AutoModel."""

    @staticmethod
    def from_pretrained(name, **kwargs) -> Emu3VisionVQModel:
        kwargs = _loading_arguments(kwargs, ("torch_dtype",))
        directory = resolve_pretrained(name)
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        if "codebook_size" not in config and "vq_config" not in config:
            raise ValueError(f"{name} is not a vision tokenizer: AutoModel loads Emu3-VisionTokenizer here; load the "
                             f"language model with AutoModelForCausalLM")
        return Emu3VisionVQModel.from_pretrained(directory, dtype=_dtype(kwargs.get("torch_dtype") or "float32")).eval()


class AutoTokenizer:
    """Emu3's text tokenizer (left padding by default, as generation needs)."""

    @staticmethod
    def from_pretrained(name, **kwargs) -> Emu3Tokenizer:
        kwargs = _loading_arguments(kwargs, ("padding_side",))
        return Emu3Tokenizer.from_pretrained(resolve_pretrained(name), padding_side=kwargs.get("padding_side", "left"))


class AutoImageProcessor:
    """Emu3's image processor (Emu3-VisionTokenizer's preprocessor_config.json)."""

    @staticmethod
    def from_pretrained(name, **kwargs) -> Emu3VisionVQImageProcessor:
        _loading_arguments(kwargs, ())
        return Emu3VisionVQImageProcessor.from_pretrained(resolve_pretrained(name))
