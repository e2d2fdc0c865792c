"""Text-to-image with Emu3-Gen: prompts in, PNG files out.

    python -m emu3.cli.generate_image --model Emu3-Gen --vq Emu3-VisionTokenizer \
        --prompt "a portrait of young girl." --ratio 16:9 --output-dir outputs

Each prompt gets BAAI's quality suffix, classifier-free guidance against BAAI's negative prompt
(the unconditional branch keeps its own KV cache), the prefix constraint that makes the output an
H x W grid of visual tokens, and top-k sampling, then the vision tokenizer decodes the tokens.
"""

import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from emu3.cli import options
from emu3.cli.errors import command
from emu3.cli.loading import add_model_arguments, check_model_arguments, load, read_configs
from emu3.cli.outputs import check_directory, locked, refuse_directories, save_image
from emu3.generation.generate import GenerationConfig, generate
from emu3.generation.parallel_rows import image_passes
from emu3.mllm.processor import generation_size, image_tokens_to_generate
from emu3.weights import atomic_open

POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
DEFAULT_PROMPT = "a portrait of young girl."
META_FILE = "generation.json"


def parse_args(argv=None):
    p = options.ArgumentParser(prog="infer_img_gen.sh", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (default: one sample prompt)")
    p.add_argument("--ratio", default="1:1", help="width:height of the images, e.g. 1:1, 16:9, 3:4 (default 1:1)")
    p.add_argument("--image-area", type=options.integer(low=1),
                   help="pixels per image (default: the model's image_area, 518400 = 720x720 for Emu3-Gen)")
    p.add_argument("--guidance-scale", type=options.real(low=1.0), default=3.0,
                   help="classifier-free guidance scale, >= 1; 1 turns guidance off (default 3.0)")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="the unconditional prompt (default: BAAI's)")
    p.add_argument("--positive-suffix", default=POSITIVE_SUFFIX,
                   help=f"appended to every prompt (default {POSITIVE_SUFFIX!r}; '' for none)")
    options.add_sampling_arguments(p, top_k=2048)
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token instead of sampling")
    p.add_argument("--parallel-window", type=options.integer(low=1), metavar="W",
                   help="decode image rows in parallel (ZipAR): a row starts once the row above has W tokens, and "
                        "each forward pass adds one token to every started row; (H-1)*min(W, width) + width passes "
                        "instead of (width+1)*H + 3 (docs/generation.md: how to choose W). Default: off, one token "
                        "per pass (BAAI's behaviour)")
    p.add_argument("--batch-size", type=options.integer(low=1), default=1,
                   help="prompts generated together (default 1; each row with CFG holds two KV caches)")
    p.add_argument("--output-dir", default="outputs", help="where the PNG files go (default outputs/)")
    add_model_arguments(p, "BAAI Emu3-Gen directory (config.json, safetensors, emu3.tiktoken, ...)")
    return p.parse_args(argv)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:length] or "image"


@command
def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_model_arguments(args)
    prompts = args.prompt or [DEFAULT_PROMPT]
    # Everything about the request is checked against the configs before any model is loaded.
    llm_config, vq_config = read_configs(args)
    image_area = args.image_area or llm_config.image_area
    h, w = generation_size(args.ratio, image_area, vq_config.spatial_factor)
    if image_tokens_to_generate(h, w) >= llm_config.max_position_embeddings:
        raise ValueError(f"an image of {h}x{w} tokens ({image_tokens_to_generate(h, w)} to generate) cannot fit the "
                         f"model's context window of {llm_config.max_position_embeddings} tokens: use a smaller "
                         "--image-area")
    gen_config = GenerationConfig(
        max_new_tokens=image_tokens_to_generate(h, w), do_sample=not args.greedy, top_k=args.top_k,
        top_p=args.top_p, temperature=args.temperature, seed=args.seed, guidance_scale=args.guidance_scale,
        eos_token_id=llm_config.eos_token_id, pad_token_id=llm_config.pad_token_id,
        parallel_window=args.parallel_window,
    )
    gen_config.validate()
    out_dir = Path(args.output_dir)
    paths = [out_dir / f"{i:03d}_{slug(prompt)}.png" for i, prompt in enumerate(prompts)]
    f = vq_config.spatial_factor
    check_directory(out_dir, "--output-dir", needed_bytes=len(prompts) * 3 * (f * h) * (f * w))
    refuse_directories(paths + [out_dir / META_FILE])
    with locked(out_dir, "--output-dir"):
        return _generate_all(args, prompts, paths, (h, w), image_area, gen_config)


def _generate_all(args, prompts, paths, size, image_area, gen_config) -> list[Path]:
    model, processor, is_demo = load(args)
    # All prompts are checked (lengths against the context window) before any generation.
    processor([p + args.positive_suffix for p in prompts], mode="G", ratio=args.ratio, image_area=image_area)
    neg = processor(args.negative_prompt, mode="G", ratio=args.ratio, image_area=image_area)
    h, w = size
    use_cfg = args.guidance_scale != 1.0
    f = processor.spatial_factor
    print(f"generating {len(prompts)} image(s) of {h}x{w} tokens ({f * w}x{f * h} pixels), "
          f"{gen_config.max_new_tokens} tokens each{', with CFG' if use_cfg else ''}", file=sys.stderr)
    out_dir = Path(args.output_dir)
    meta = {"prompts": prompts, "files": [], "finished": False, "ratio": args.ratio, "image_area": image_area,
            "tokens": [h, w], "guidance_scale": args.guidance_scale, "top_k": args.top_k, "top_p": args.top_p,
            "temperature": args.temperature, "greedy": args.greedy, "seed": args.seed,
            "batch_size": args.batch_size, "parallel_window": args.parallel_window}
    if is_demo:
        meta["random_demo_weights"] = True
    # generation.json always describes this run: the files finished so far, and whether all are.
    _write_meta(out_dir, meta)
    written = []
    start = time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        chunk = prompts[first:first + args.batch_size]
        inputs = processor([p + args.positive_suffix for p in chunk], mode="G", ratio=args.ratio,
                           image_area=image_area)
        rows = len(chunk)
        ids = generate(
            model, inputs["input_ids"], inputs["attention_mask"], gen_config,
            negative_input_ids=np.repeat(neg["input_ids"], rows, 0) if use_cfg else None,
            negative_attention_mask=np.repeat(neg["attention_mask"], rows, 0) if use_cfg else None,
            image_size=(h, w),
        )
        for prompt, row, path in zip(chunk, ids, paths[first:]):
            images = [part for part in processor.decode(row) if not isinstance(part, str)]
            save_image(images[0], path)
            written.append(path)
            meta["files"].append(path.name)
            _write_meta(out_dir, meta)
            print(f"{path}  <- {prompt!r}")
    seconds = time.perf_counter() - start
    # One generation per batch; with guidance each pass runs both branches.
    batches = -(-len(prompts) // args.batch_size)
    passes = batches * image_passes(h, w, args.parallel_window)
    sequential = batches * image_passes(h, w, None)
    decoding = ("one token per pass" if args.parallel_window is None
                else f"rows in parallel, window {args.parallel_window}; sequential decoding: {sequential}")
    print(f"{len(written)} image(s) in {seconds:.1f} s: {passes} forward passes ({decoding})", file=sys.stderr)
    meta.update(finished=True, seconds=round(seconds, 2), forward_passes=passes)
    _write_meta(out_dir, meta)
    if is_demo:
        print("NOTE: these images come from RANDOM demo weights and are noise.", file=sys.stderr)
    return written


def _write_meta(out_dir: Path, meta: dict) -> None:
    with atomic_open(out_dir / META_FILE) as f:
        f.write((json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
