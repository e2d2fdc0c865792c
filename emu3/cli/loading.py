"""What the inference commands share: the run-mode / dtype / weights options and loading the models.

Without --model and --vq the commands fall back to the tiny random demo checkpoints of
`emu3.demo`, and say so loudly; with real weights directories nothing about the demo shows.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

from emu3 import backend
from emu3.demo import DEMO_IMAGE_PIXELS, DEMO_LLM_CONFIG, DEMO_VQ_CONFIG, demo_checkpoints
from emu3.mllm.config import Emu3Config
from emu3.mllm.model import Emu3ForCausalLM
from emu3.mllm.processor import Emu3Processor
from emu3.mllm.tokenizer import Emu3Tokenizer
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel

logger = logging.getLogger("emu3")

DEMO_BANNER = """
##############################################################################
#  NO WEIGHTS GIVEN: using the tiny RANDOMLY INITIALISED demo checkpoints.   #
#  They show the whole pipeline running; their output is NOISE.               #
#  For real results pass --model <Emu3-Gen or Emu3-Chat dir>                  #
#  and --vq <Emu3-VisionTokenizer dir> (BAAI's checkpoints).                  #
##############################################################################
"""


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", help=model_help + " (omit both --model and --vq for the random demo)")
    parser.add_argument("--vq", help="BAAI Emu3-VisionTokenizer directory (config.json, model.safetensors, "
                                     "preprocessor_config.json)")
    parser.add_argument("--mode", choices=sorted(backend.MODES), default="pynative",
                        help="MindSpore execution mode (default pynative; graph compiles the decode step once)")
    parser.add_argument("--dtype", choices=sorted(backend.DTYPES),
                        help="language-model weights dtype (default bf16 on Ascend, fp32 on CPU; the vision "
                             "tokenizer always runs in fp32)")
    parser.add_argument("--device", choices=["CPU", "Ascend"], help="device (default: MindSpore's own choice)")
    parser.add_argument("--attn-implementation", choices=backend.ATTN_IMPLEMENTATIONS,
                        help="attention kernel (default flash_attention_2 on Ascend, eager on CPU)")


def check_model_arguments(args) -> None:
    """Refuse inconsistent weights options before anything is loaded."""
    if (args.model is None) != (args.vq is None):
        raise ValueError("give both --model and --vq (BAAI's weights directories), or neither for the random demo")
    for name in ("model", "vq"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"--{name} {path} is not a directory")


def read_configs(args) -> tuple[Emu3Config, Emu3VisionVQConfig]:
    """The two models' configs, read and checked in a moment, so that options can be checked
    against them (image sizes, the context window) before minutes of loading."""
    if args.model is None:
        return Emu3Config(**DEMO_LLM_CONFIG), Emu3VisionVQConfig(**DEMO_VQ_CONFIG)
    return Emu3Config.from_pretrained(args.model), Emu3VisionVQConfig.from_pretrained(args.vq)


def read_image_processor(args) -> Emu3VisionVQImageProcessor:
    """The image processor `load` will give, without loading anything else."""
    if args.vq is None:
        return Emu3VisionVQImageProcessor(**DEMO_IMAGE_PIXELS)
    return Emu3VisionVQImageProcessor.from_pretrained(args.vq)


def load(args) -> tuple[Emu3ForCausalLM, Emu3Processor, bool]:
    """(model, processor, is_demo) from the parsed options; sets the run mode and device first."""
    backend.set_run_mode(args.mode, args.device)
    is_demo = args.model is None
    if is_demo:
        print(DEMO_BANNER, file=sys.stderr, flush=True)
        model_dir, vq_dir = demo_checkpoints()
    else:
        model_dir, vq_dir = args.model, args.vq
    dtype = args.dtype or backend.default_dtype()
    attn = args.attn_implementation or backend.default_attn_implementation()

    start = time.perf_counter()
    tokenizer = Emu3Tokenizer.from_pretrained(model_dir)
    model = Emu3ForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).fuse_projections()
    model.set_train(False)
    vision_tokenizer = Emu3VisionVQModel.from_pretrained(vq_dir)
    vision_tokenizer.set_train(False)
    image_processor = Emu3VisionVQImageProcessor.from_pretrained(vq_dir)
    processor = Emu3Processor(image_processor, vision_tokenizer, tokenizer,
                              context_length=model.config.max_position_embeddings)
    logger.info("loaded %s and %s (%s, %s, %s mode) in %.1f s", model_dir, vq_dir, dtype, attn, args.mode,
                time.perf_counter() - start)
    return model, processor, is_demo
