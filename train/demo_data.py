"""A small synthetic SFT data set for trying the training scripts without real data or weights.

    python -m train.demo_data --task t2i --output DIR

Draws a few images (coloured shapes on plain backgrounds, each with a caption / a question and
answer), tokenises them with the tiny demo vision tokenizer (emu3.demo) through the same
preparation code as real data, and prints the demo language model's directory on stdout (progress
goes to stderr). The tokens are meaningless; the data only shows that every stage runs.
"""

import argparse
import itertools
import json
import logging
from pathlib import Path
from types import SimpleNamespace

from PIL import Image, ImageDraw

from emu3.demo import DEMO_LLM_CONFIG, demo_checkpoints
from emu3.cli.errors import command
from train.prepare_common import run

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
SHAPES = ("square", "circle")


def draw(shape: str, colour: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    paint = ImageDraw.Draw(image)
    (paint.rectangle if shape == "square" else paint.ellipse)(box, fill=COLOURS[colour])
    return image


@command
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["t2i", "vqa"], required=True)
    parser.add_argument("--output", required=True, help="prepared data directory to write")
    args = parser.parse_args(argv)
    llm_dir, vq_dir = demo_checkpoints()
    out = Path(args.output)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = []
    for shape, colour in itertools.product(SHAPES, COLOURS):
        name = f"{colour}_{shape}"
        draw(shape, colour).save(images / f"{name}.png")
        item = {"name": name, "image": images / f"{name}.png"}
        if args.task == "t2i":
            item["texts"] = f"a {colour} {shape} on a white background"
        else:
            item.update(texts="What colour is the shape?", response=f"It is {colour}.")
        items.append(item)
    (out / "source.json").write_text(json.dumps([{**it, "image": str(it["image"])} for it in items], indent=1))
    prep = SimpleNamespace(vq_path=str(vq_dir), output=str(out), image_area=DEMO_LLM_CONFIG["image_area"],
                           mode="pynative", dtype="fp32")
    run(items, prep, "tokenizing demo images", args.task)
    print(llm_dir)


if __name__ == "__main__":
    main()
