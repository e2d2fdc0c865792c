"""The web demo's engine on the demo checkpoints, without a browser: the streamed picture ends as the
command-line script's image, previews fill in row by row, stop works between chunks, the streamed
answer is the VQA script's, jobs take turns on the models, and bad input raises a sentence."""

import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

from emu3.cli import generate_image, vqa
from emu3.cli.loading import load
from emu3.web.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("web_engine")
    old = os.environ.get("EMU3_DEMO_DIR")
    os.environ["EMU3_DEMO_DIR"] = str(root / "demo")
    args = vqa.parse_args([])
    model, processor, _ = load(args)
    yield Engine(model, processor, output_dir=root / "out", chat_max_new_tokens=16)
    if old is None:
        os.environ.pop("EMU3_DEMO_DIR")
    else:
        os.environ["EMU3_DEMO_DIR"] = old


def test_picture_streams_and_ends_as_the_scripts_image(engine, tmp_path):
    # Without guidance for time (one row per step instead of two); the browser test runs guidance.
    updates = list(engine.text_to_image("a red apple", "2:1", guidance_scale=1.0, greedy=True))
    final = updates[-1]
    assert final.status.startswith("Done") and final.path.is_file()
    [ours] = generate_image.main(["--prompt", "a red apple", "--ratio", "2:1", "--greedy", "--guidance-scale", "1",
                                  "--output-dir", str(tmp_path)])
    np.testing.assert_array_equal(np.asarray(Image.open(final.path)), np.asarray(Image.open(ours)))
    assert final.image.size == (88, 48)  # 2:1 at the demo's 64x64-pixel area: 6x11 tokens
    previews = [u for u in updates[:-1] if u.image is not None]
    assert any("tokens/s" in u.status and "s left" in u.status for u in updates)
    assert len(previews) >= 3
    # Each preview holds the rows generated so far, the rest of the canvas grey; the last is the finished picture.
    rows = [int(re.search(r"row (\d+)/6", p.status)[1]) for p in previews]
    assert rows == sorted(set(rows)) and rows[-1] == 6
    for row, preview in zip(rows, previews):
        assert (np.asarray(preview.image)[8 * row:] == 128).all()
    np.testing.assert_array_equal(np.asarray(previews[-1].image), np.asarray(final.image))


def test_stop_ends_the_job_at_the_next_chunk(engine):
    stop = threading.Event()
    stop.set()
    updates = list(engine.text_to_image("a red apple", "1:1", greedy=True, stop=stop))
    assert updates[-1].status.startswith("Stopped after 1 of 8 rows") and updates[-1].path is None


def test_answer_streams_the_vqa_scripts_answer(engine, tmp_path):
    picture = vqa.demo_image(tmp_path / "in.png")
    updates = list(engine.answer(str(picture), "What is in the picture?"))
    [record] = vqa.main(["--image", str(picture), "--question", "What is in the picture?",
                         "--output", str(tmp_path / "a.jsonl")])
    assert updates[-1].text == record["answer"] and updates[-1].status.startswith("Done: 16 tokens")
    assert [u.text for u in updates[1:-1]] == [record["answer"]]  # one chunk of 16 tokens


def test_jobs_from_two_callers_take_turns(engine):
    first = engine.text_to_image("one", "1:1", guidance_scale=1.0, greedy=True)
    second = engine.text_to_image("one", "1:1", guidance_scale=1.0, greedy=True)
    a, b = next(first), next(second)  # both queued; the second waits for the first
    assert a.status.startswith("Generating") and b.status.startswith("Generating")
    done = [list(second)[-1], list(first)[-1]]  # read in the other order: still two whole jobs
    assert all(update.status.startswith("Done") for update in done)
    np.testing.assert_array_equal(np.asarray(done[0].image), np.asarray(done[1].image))


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="  "), "Type a prompt first"),
    (dict(prompt="x", ratio="abc"), "ratio must be 'W:H'"),
    (dict(prompt="x", ratio="1000:1"), "too small for ratio 1000:1"),
    (dict(prompt="x", guidance_scale=0.5), "Guidance scale must be at least 1"),
    (dict(prompt="x", top_p=0), r"top_p must be a finite number in \(0, 1\]"),
])
def test_bad_picture_requests_raise_a_sentence(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        list(engine.text_to_image(**kwargs))


def test_bad_chat_requests_raise_a_sentence(engine, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    picture = vqa.demo_image(tmp_path / "in.png")
    for args, message in (((None, "q"), "Upload an image first"), ((str(picture), " "), "Type a question first"),
                          ((str(text), "q"), "not a picture this demo can read")):
        with pytest.raises(ValueError, match=message):
            list(engine.answer(*args))


def test_a_16_bit_upload_is_scaled_as_the_commands_scale_it(tmp_path):
    """PIL's own conversion would clip 16-bit greys to 255 (a white picture)."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(path)
    picture = Engine.open_image(path)
    assert picture.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(picture)[0, :, 0], [0, 128, 255])
