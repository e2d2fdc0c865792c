"""Visual question answering with Emu3-Chat: images and questions in, answers printed and saved.

    python -m emu3.cli.vqa --model Emu3-Chat --vq Emu3-VisionTokenizer \
        --image cat.png --image street.jpg --question "Please describe the image"

One question is asked of every image, or give one --question per --image. All pairs run as one
left-padded batch; decoding is greedy unless --sample. Answers go to stdout and to a JSON-lines file.
"""

import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from emu3.cli import options
from emu3.cli.errors import command
from emu3.cli.loading import add_model_arguments, check_model_arguments, load, read_configs, read_image_processor
from emu3.cli.outputs import check_file, locked, save_image
from emu3.generation.generate import GenerationConfig, generate
from emu3.tokenizer.image_processor import open_image
from emu3.weights import atomic_open

DEFAULT_QUESTION = "Please describe the image"
MAX_NEW_TOKENS = 320
# Random weights never say eos: keep the demo's answers short so it finishes quickly.
DEMO_MAX_NEW_TOKENS = 16


def parse_args(argv=None):
    p = options.ArgumentParser(prog="infer_vqa.sh", description=__doc__.split("\n")[0])
    p.add_argument("--image", action="append",
                   help="an image file; repeat for several (required with --model; the demo draws one)")
    p.add_argument("--question", action="append",
                   help=f"a question: one for all images or one per image (default {DEFAULT_QUESTION!r})")
    p.add_argument("--max-new-tokens", type=options.integer(low=1),
                   help=f"longest answer in tokens (default {MAX_NEW_TOKENS}; {DEMO_MAX_NEW_TOKENS} with the "
                        "demo weights)")
    p.add_argument("--sample", action="store_true", help="sample answers instead of greedy decoding")
    options.add_sampling_arguments(p, top_k=0, when="with --sample: ")
    p.add_argument("--output", default="outputs/vqa_answers.jsonl",
                   help="JSON-lines file for the answers (default outputs/vqa_answers.jsonl)")
    add_model_arguments(p, "BAAI Emu3-Chat directory (config.json, safetensors, emu3.tiktoken, ...)")
    return p.parse_args(argv)


def demo_image(path: Path) -> Path:
    """A colour-gradient picture for the demo, which has no image of its own to ask about."""
    gradient = Image.linear_gradient("L").resize((128, 96))
    save_image(Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90).resize((128, 96)),
                                   Image.new("L", (128, 96), 128))), path)
    return path


@command
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_model_arguments(args)
    if not args.image and args.model is not None:
        raise ValueError("give at least one --image to ask about")
    questions = args.question or [DEFAULT_QUESTION]
    paths = [Path(p) for p in args.image] if args.image else []
    if len(questions) not in (1, max(len(paths), 1)):
        raise ValueError(f"give one --question for all images or one per image: {len(questions)} questions "
                         f"for {len(paths)} images")
    # Everything about the request is checked before any model is loaded: the numbers against the
    # config, every image decoded in full and sized against the context window.
    llm_config, vq_config = read_configs(args)
    max_new_tokens = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if args.model is None else MAX_NEW_TOKENS)
    context = llm_config.max_position_embeddings
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                         f"window of {context} tokens")
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=args.sample, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, seed=args.seed, eos_token_id=llm_config.eos_token_id,
        pad_token_id=llm_config.pad_token_id,
    )
    gen_config.validate()
    images = [open_image(p) for p in paths]
    _check_image_sizes(paths, images, read_image_processor(args), vq_config.spatial_factor, max_new_tokens, context)
    output = check_file(args.output, "--output")
    with locked(output, "--output"):
        return _answer(args, paths, images, questions, output, gen_config)


def _check_image_sizes(paths, images, image_processor, factor, max_new_tokens, context) -> None:
    """Each image's tokens (after the processor's resize) plus the answer must fit the context
    window; the prompt's text is checked with the tokenizer once it is loaded."""
    for path, image in zip(paths, images):
        try:
            height, width = image_processor.smart_resize(image.height, image.width)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        tokens = (height // factor) * (width // factor + 1)
        if tokens + max_new_tokens >= context:
            raise ValueError(f"{path} becomes {tokens} tokens ({height // factor}x{width // factor} plus row ends), "
                             f"which with --max-new-tokens {max_new_tokens} pass the model's context window of "
                             f"{context}: lower --max-new-tokens or use a smaller image")


def _answer(args, paths, images, questions, output, gen_config) -> list[dict]:
    model, processor, is_demo = load(args)
    if not paths:
        paths = [demo_image(output.parent / "demo_input.png")]
        images = [open_image(paths[0])]
        print(f"no --image given: asking about a drawn gradient picture, {paths[0]}", file=sys.stderr)
    questions = questions * len(images) if len(questions) == 1 else questions
    inputs = processor(questions, image=images, mode="U")
    prompt_len = inputs["input_ids"].shape[1]
    context = model.config.max_position_embeddings
    if prompt_len + gen_config.max_new_tokens > context:
        raise ValueError(f"the prompt is {prompt_len} tokens and --max-new-tokens {gen_config.max_new_tokens} would "
                         f"pass the model's context window of {context}: lower --max-new-tokens or use smaller images")
    tok = processor.tokenizer
    start = time.perf_counter()
    ids = generate(model, inputs["input_ids"], inputs["attention_mask"], gen_config)
    seconds = time.perf_counter() - start

    records = []
    for path, question, row in zip(paths, questions, ids[:, prompt_len:]):
        row = row.tolist()
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        answer = tok.decode(row, skip_special_tokens=True)
        records.append({"image": str(path), "question": question, "answer": answer})
        print(f"[{path}] Q: {question}\nA: {answer}\n")
    with atomic_open(output) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    print(f"answers written to {output} ({seconds:.1f} s of generation)", file=sys.stderr)
    if is_demo:
        print("NOTE: these answers come from RANDOM demo weights and are gibberish.", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
