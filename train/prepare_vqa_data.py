"""VQA data: LLaVA-style conversations to SFT feature files (image tokens, question, answer).

    python -m train.prepare_vqa_data --input llava.json --vq_path Emu3-VisionTokenizer --output DATA_DIR

llava.json is a list of {"id": ..., "image": <path, absolute or relative to the JSON file>,
"conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"},
...]}. Every human/gpt pair becomes one sample named "<id>" (first pair) or "<id>_<k>" (k-th pair),
holding the image's tokens, the question (the "<image>" placeholder removed) and the answer as
response. Output, resuming and error reporting as in prepare_vision_data.
"""

import argparse
import logging
from pathlib import Path

from emu3.cli.errors import command
from train.prepare_common import add_common_args, check_strings, read_json_list, resolve, run

IMAGE_PLACEHOLDER = "<image>"


def load_conversations(path: Path) -> list[dict]:
    entries = read_json_list(path, "LLaVA conversation records")
    items = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"id", "image", "conversations"} <= e.keys():
            raise ValueError(f"{path}: record {i} needs id, image and conversations")
        check_strings(path, f"record {i}", image=e["image"])
        turns = e["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{path}: record {i}: conversations must be a list of {{from, value}} objects")
        pairs = [(turns[j], turns[j + 1]) for j in range(0, len(turns) - 1, 2)]
        for k, (human, gpt) in enumerate(pairs):
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise ValueError(f"{path}: record {e['id']!r} turn {2 * k}: expected a human then a gpt turn, "
                                 f"got {human.get('from')!r}, {gpt.get('from')!r}")
            check_strings(path, f"record {e['id']!r} turn {2 * k}", question=human.get("value"),
                          answer=gpt.get("value"))
            question = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            items.append({"name": str(e["id"]) if k == 0 else f"{e['id']}_{k}",
                          "image": resolve(e["image"], path.parent), "texts": question, "response": gpt["value"]})
    return items


@command
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="LLaVA-style JSON list of conversations")
    add_common_args(parser)
    args = parser.parse_args(argv)
    run(load_conversations(Path(args.input)), args, "tokenizing VQA images", "vqa")


if __name__ == "__main__":
    main()
