"""Learning for real: fine-tune a tiny Emu3 until it memorises its samples, then decode them back.

Decoding is emu3.generation.generate (branch gen): greedy, KV-cached, and for images with
Emu3's prefix constraint (visual tokens, eol at row ends, then eof, eoi, eos).
"""

import numpy as np
import pytest

from emu3.generation import GenerationConfig, generate
from train.dataset import VQA_ASSISTANT, VQA_SYSTEM
from train.sft import Run, parse_args

from .conftest import grid, make_data, make_model_dir

pytestmark = pytest.mark.slow


def fine_tune(tmp_path, task, samples, steps, lr, max_length):
    model_dir = make_model_dir(tmp_path / "model", hidden_size=64, intermediate_size=128)
    data = make_data(tmp_path / "data", samples)
    run = Run(parse_args([
        "--model_path", str(model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
        "--task", task, "--max_length", str(max_length), "--batch_size", str(len(samples)), "--max_steps", str(steps),
        "--lr", str(lr), "--min_lr", str(lr / 10), "--weight_decay", "0", "--null_prompt_prob", "0",
        "--save_steps", "1000", "--save_total_limit", "1"]))
    run.train()
    run.model.set_train(False)
    return run


def test_t2i_memorises_two_images_and_generates_their_grids(tmp_path):
    grids = {"a red square": grid(10, 2, 3), "a blue circle": grid(11, 2, 3)}
    run = fine_tune(tmp_path, "t2i", [{"name": f"s{i}", "images": g, "texts": t}
                                      for i, (t, g) in enumerate(grids.items())], steps=24, lr=2e-2,
                    max_length=24)
    tok = run.dataset.tok
    for caption, codes in grids.items():
        prompt = ([tok.bos_token_id] + tok.encode(caption) + [tok.boi_token_id] + tok.encode("2*3")
                  + [tok.img_token_id])
        out = generate(run.model, np.asarray([prompt], np.int32), np.ones((1, len(prompt)), np.int32),
                       GenerationConfig(max_new_tokens=2 * 4 + 3, do_sample=False), image_size=(2, 3),
                       progress=False)[0, len(prompt):]
        rows = out[:8].reshape(2, 4)
        assert (rows[:, 3] == tok.eol_token_id).all()
        np.testing.assert_array_equal(rows[:, :3] - tok.visual_token_id(0), codes, err_msg=caption)
        assert out[8:].tolist() == [tok.eof_token_id, tok.eoi_token_id, tok.eos_token_id]


def test_vqa_memorises_its_answer(tmp_path):
    codes = grid(12, 2, 2)
    question, answer = "What is shown?", " A red square on white."
    run = fine_tune(tmp_path, "vqa", [{"name": "q", "images": codes, "texts": question, "response": answer}],
                    steps=30, lr=2e-2, max_length=48)
    ds = run.dataset
    prompt = ([ds.tok.bos_token_id] + ds.tok.encode(VQA_SYSTEM) + ds.image_ids(codes)
              + ds.tok.encode(question + VQA_ASSISTANT))
    expected = ds.tok.encode(answer) + [ds.tok.eos_token_id]
    out = generate(run.model, np.asarray([prompt], np.int32), np.ones((1, len(prompt)), np.int32),
                   GenerationConfig(max_new_tokens=len(expected) + 2, do_sample=False), progress=False)
    generated = out[0, len(prompt):].tolist()
    assert generated[: len(expected)] == expected
    assert ds.tok.decode(generated[: len(expected) - 1]) == answer
