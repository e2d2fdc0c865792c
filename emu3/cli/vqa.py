"""Visual question answering with Emu3-Chat: images and questions in, answers printed and saved.

    python -m emu3.cli.vqa --model Emu3-Chat --vq Emu3-VisionTokenizer \
        --image cat.png --image street.jpg --question "Please describe the image"

One question is asked of every image, or give one --question per --image. All pairs run as one
left-padded batch; decoding is greedy unless --sample. Answers go to stdout and to a JSON-lines file.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from emu3.cli.loading import add_model_arguments, check_model_arguments, load
from emu3.generation.generate import GenerationConfig, generate

DEFAULT_QUESTION = "Please describe the image"
MAX_NEW_TOKENS = 320
# Random weights never say eos: keep the demo's answers short so it finishes quickly.
DEMO_MAX_NEW_TOKENS = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="infer_vqa.sh", description=__doc__.split("\n")[0])
    p.add_argument("--image", action="append",
                   help="an image file; repeat for several (required with --model; the demo draws one)")
    p.add_argument("--question", action="append",
                   help=f"a question: one for all images or one per image (default {DEFAULT_QUESTION!r})")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"longest answer in tokens (default {MAX_NEW_TOKENS}; {DEMO_MAX_NEW_TOKENS} with the "
                        "demo weights)")
    p.add_argument("--sample", action="store_true", help="sample answers instead of greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="with --sample: keep the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus threshold (default 1.0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample: temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=42, help="with --sample: the seed (default 42)")
    p.add_argument("--output", default="outputs/vqa_answers.jsonl",
                   help="JSON-lines file for the answers (default outputs/vqa_answers.jsonl)")
    add_model_arguments(p, "BAAI Emu3-Chat directory (config.json, safetensors, emu3.tiktoken, ...)")
    return p.parse_args(argv)


def demo_image(path: Path) -> Path:
    """A colour-gradient picture for the demo, which has no image of its own to ask about."""
    gradient = Image.linear_gradient("L").resize((128, 96))
    Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90).resize((128, 96)),
                        Image.new("L", (128, 96), 128))).save(path)
    return path


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_model_arguments(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        sys.exit(f"error: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.image and args.model is not None:
        sys.exit("error: give at least one --image to ask about")
    questions = args.question or [DEFAULT_QUESTION]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.image] if args.image else []
    if len(questions) not in (1, max(len(paths), 1)):
        sys.exit(f"error: give one --question for all images or one per image: {len(questions)} questions "
                 f"for {len(paths)} images")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: image file(s) not found: {', '.join(missing)}")

    model, processor, is_demo = load(args)
    max_new_tokens = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if is_demo else MAX_NEW_TOKENS)
    if not paths:
        paths = [demo_image(output.parent / "demo_input.png")]
        print(f"no --image given: asking about a drawn gradient picture, {paths[0]}", file=sys.stderr)
    images = [Image.open(p).convert("RGB") for p in paths]
    questions = questions * len(images) if len(questions) == 1 else questions
    try:
        inputs = processor(questions, image=images, mode="U")
    except ValueError as err:
        sys.exit(f"error: {err}")
    prompt_len = inputs["input_ids"].shape[1]
    context = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > context:
        sys.exit(f"error: the prompt is {prompt_len} tokens and --max-new-tokens {max_new_tokens} would pass "
                 f"the model's context window of {context}: lower --max-new-tokens or use smaller images")
    tok = processor.tokenizer
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=args.sample, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, seed=args.seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
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
    with open(output, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"answers written to {output} ({seconds:.1f} s of generation)", file=sys.stderr)
    if is_demo:
        print("NOTE: these answers come from RANDOM demo weights and are gibberish.", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
