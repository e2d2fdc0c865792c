"""Sequences and loss masks: exactly the vision tokens (T2I) / the response (VQA) are supervised."""

import numpy as np
import pytest

from train.dataset import DataLoader, SFTDataset, drops_prompt, shift_labels
from train.trainer import IGNORE_INDEX

from .conftest import grid, make_data


def image_string(tok, codes):
    h, w = codes.shape
    rows = "".join("".join(f"<|visual token {c:06d}|>" for c in row) + tok.eol_token for row in codes)
    return tok.boi_token + f"{h}*{w}" + tok.img_token + rows + tok.eof_token + tok.eoi_token


def test_t2i_supervises_exactly_the_vision_tokens(tmp_path, tokenizer):
    codes = grid(1, 2, 3)
    data = make_data(tmp_path, [{"name": "cat", "images": codes, "texts": "a cat, 2 ears"}])
    ds = SFTDataset(data, tokenizer, "t2i", max_length=40, null_prompt_prob=0.0)
    item = ds[0, 0]
    # the same sequence written as one string, tokenised as BAAI's dataset does
    expected = tokenizer.encode(tokenizer.bos_token + "a cat, 2 ears" + image_string(tokenizer, codes))
    n = len(expected)
    assert item["input_ids"][:n].tolist() == expected
    assert (item["input_ids"][n:] == tokenizer.pad_token_id).all()
    supervised = np.flatnonzero(item["labels"] != IGNORE_INDEX)
    visual = [i for i, t in enumerate(expected) if tokenizer.is_visual(t)]
    assert supervised.tolist() == visual and len(visual) == 6
    assert (item["labels"][supervised] == item["input_ids"][supervised]).all()
    assert (item["labels"][supervised] - tokenizer.visual_token_id(0) == codes.reshape(-1)).all()


def test_vqa_supervises_exactly_the_response_and_eos(tmp_path, tokenizer):
    codes = grid(2, 2, 2)
    data = make_data(tmp_path, [{"name": "q", "images": codes, "texts": "What colour is it?",
                                 "response": " It is blue."}])
    ds = SFTDataset(data, tokenizer, "vqa", max_length=64)
    item = ds[0, 0]
    prompt = tokenizer.encode(tokenizer.bos_token + "You are a helpful assistant. USER: "
                              + image_string(tokenizer, codes) + "What colour is it?. ASSISTANT:")
    answer = tokenizer.encode(" It is blue.") + [tokenizer.eos_token_id]
    n = len(prompt) + len(answer)
    assert item["input_ids"][:n].tolist() == prompt + answer
    supervised = np.flatnonzero(item["labels"] != IGNORE_INDEX)
    assert supervised.tolist() == list(range(len(prompt), n))
    assert item["labels"][supervised].tolist() == answer


def test_over_long_rule_truncates_the_caption_then_skips(tmp_path, tokenizer):
    codes = grid(3, 2, 2)  # image string: boi, "2*2" (3 tokens), img, 2*(2+1), eof, eoi = 13 tokens
    data = make_data(tmp_path, [{"name": "long", "images": codes, "texts": "one two three four five six"}])
    image_len = len(tokenizer.encode(image_string(tokenizer, codes)))
    ds = SFTDataset(data, tokenizer, "t2i", max_length=1 + image_len + 2, null_prompt_prob=0.0)
    item = ds[0, 0]
    assert ds.truncated == 1 and ds.skipped == 0
    caption = tokenizer.encode("one two three four five six")[:2]
    assert item["input_ids"][1:3].tolist() == caption
    assert (item["labels"] != IGNORE_INDEX).sum() == 4  # the whole image is kept
    tight = SFTDataset(data, tokenizer, "t2i", max_length=image_len, null_prompt_prob=0.0)
    assert tight[0, 0] is None and tight.skipped == 1


def test_prompt_dropout_rate_and_determinism(tmp_path, tokenizer):
    draws = [drops_prompt(7, e, i, 0.05) for e in range(10) for i in range(2000)]
    assert 0.045 < np.mean(draws) < 0.055
    assert draws[:500] == [drops_prompt(7, 0, i, 0.05) for i in range(500)]
    data = make_data(tmp_path, [{"name": f"s{i}", "images": grid(i, 1, 1), "texts": "caption"} for i in range(4)])
    ds = SFTDataset(data, tokenizer, "t2i", max_length=16, null_prompt_prob=0.05, seed=7)
    index, epoch = next((i % 4, i // 4) for i in range(2000) if drops_prompt(7, i // 4, i % 4, 0.05))
    dropped = ds[index, epoch]["input_ids"]
    assert dropped[1] == tokenizer.boi_token_id  # bos, then straight to the image: empty caption
    kept = ds[index, epoch + 1 if not drops_prompt(7, epoch + 1, index, 0.05) else epoch + 2]["input_ids"]
    assert kept[1:2].tolist() == tokenizer.encode("caption")


def test_shifted_labels_and_data_order_resume(tmp_path, tokenizer):
    np.testing.assert_array_equal(shift_labels(np.array([[5, -100, 7, 8]])), [[-100, 7, 8, -100]])
    data = make_data(tmp_path, [{"name": f"s{i}", "images": grid(i, 1, 1), "texts": f"c{i}"} for i in range(5)])
    ds = SFTDataset(data, tokenizer, "t2i", max_length=16, null_prompt_prob=0.0)
    full = DataLoader(ds, batch_size=2, seed=3)
    names = [full.next_batch()["names"] for _ in range(6)]
    assert sorted(sum(names[:2], []) + names[2][:1]) == [f"s{i}" for i in range(5)]  # one epoch, shuffled
    part = DataLoader(ds, batch_size=2, seed=3)
    for _ in range(3):
        part.next_batch()
    resumed = DataLoader(ds, batch_size=2, seed=3)
    resumed.restore(part.position)
    assert [resumed.next_batch()["names"] for _ in range(3)] == names[3:]
    replicas = [DataLoader(ds, batch_size=1, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    seen = [replicas[r].next_batch()["names"][0] for _ in range(2) for r in range(2)]
    assert len(set(seen)) == 4


def test_bad_task_and_missing_listing_are_explained(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="prepare the data first"):
        SFTDataset(tmp_path, tokenizer, "t2i", 16)
    with pytest.raises(ValueError, match="task must be"):
        SFTDataset(tmp_path, tokenizer, "video", 16)
