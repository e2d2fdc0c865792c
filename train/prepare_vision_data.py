"""Text-to-image data: tokenise images with the vision tokenizer into SFT feature files.

    python -m train.prepare_vision_data --input pairs.json --vq_path Emu3-VisionTokenizer --output DATA_DIR

pairs.json is a list of {"name": ..., "text": <caption>, "image": <path, absolute or relative to
the JSON file>}. Output (see train/dataset.py): DATA_DIR/feature/<name>.npz with the token grid
and the caption, DATA_DIR/list/train.json listing them. Re-running skips samples already written;
unreadable images are reported by name, listed in DATA_DIR/failed.json and skipped.
"""

import argparse
import logging
from pathlib import Path

from emu3.cli.errors import command
from train.prepare_common import add_common_args, check_strings, read_json_list, resolve, run


def load_pairs(path: Path) -> list[dict]:
    entries = read_json_list(path, "{name, text, image} objects")
    items = []
    for i, e in enumerate(entries):
        missing = [k for k in ("name", "text", "image") if not isinstance(e, dict) or k not in e]
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {missing} (each needs name, text, image)")
        check_strings(path, f"entry {i}", text=e["text"], image=e["image"])
        items.append({"name": str(e["name"]), "image": resolve(e["image"], path.parent), "texts": e["text"]})
    return items


@command
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSON list of {name, text, image}")
    add_common_args(parser)
    args = parser.parse_args(argv)
    run(load_pairs(Path(args.input)), args, "tokenizing images", "t2i")


if __name__ == "__main__":
    main()
