"""Emu3Processor: prompt strings and ids against the reference rules, sizes against transformers'
Emu3Processor, images through the vision tokenizer and back, and every bad input's error.

The expected prompts are written out here from the rules in the facts file (BAAI's processor),
independently of the processor's own string building.
"""

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from emu3.generation.constraints import build_prefix_constraint
from emu3.mllm.processor import Emu3Processor, generation_size
from emu3.mllm.tokenizer import Emu3Tokenizer
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel
from tests.mllm.tokenizer_files import write_tokenizer_files

BOS, BOI, IMG, EOL, EOF, EOI = ("<|extra_203|>", "<|image start|>", "<|image token|>", "<|extra_200|>",
                                "<|extra_201|>", "<|image end|>")
TINY_VQ = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3])
PIXELS = dict(min_pixels=48 * 48, max_pixels=96 * 96)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Emu3Tokenizer.from_pretrained(write_tokenizer_files(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def vq():
    ms.set_seed(0)
    model = Emu3VisionVQModel(Emu3VisionVQConfig(**TINY_VQ))
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def image_processor():
    return Emu3VisionVQImageProcessor(**PIXELS)


@pytest.fixture(scope="module")
def processor(tok, vq, image_processor):
    return Emu3Processor(image_processor, vq, tok)


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_generate_size(ratio, area):
    from transformers.models.emu3.processing_emu3 import Emu3Processor as Reference

    return Reference.calculate_generate_size(None, ratio, area, 8)


def unpadded(row, mask):
    return [int(t) for t, m in zip(row, mask) if m]


def test_generation_size_matches_transformers():
    ratios = ["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "1:2", "5:7", "123:45", "2:1"]
    # 400 = 20x20 and 784 = 28x28 put a side at exactly 2.5 and 3.5 tokens: round half to even.
    areas = [518400, 720 * 1280, 262144, 65536, 4096, 1048576, 777777, 1000, 400, 784]
    for ratio in ratios:
        for area in areas:
            expected = reference_generate_size(ratio, area)
            if min(expected) < 1:
                with pytest.raises(ValueError, match="too small"):
                    generation_size(ratio, area)
            else:
                assert generation_size(ratio, area) == expected, (ratio, area)
    assert generation_size("1:1", 518400) == (90, 90)
    assert generation_size("16:9", 518400) == (68, 120)
    assert generation_size("1:1", 400) == (2, 2) and generation_size("1:1", 784) == (4, 4)


def test_mode_g_prompts(processor, tok):
    texts = ["a cat", "a portrait of young girl. masterpiece, film grained, best quality.", "中文 2024"]
    out = processor(texts, mode="G", ratio="16:9", image_area=518400)
    h, w = reference_generate_size("16:9", 518400)
    assert out["image_size"].tolist() == [[h, w]] * 3
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == out["attention_mask"].shape
    for text, row, mask in zip(texts, out["input_ids"], out["attention_mask"]):
        ids = unpadded(row, mask)
        assert tok.decode(ids) == f"{BOS}{text}{BOI}{h}*{w}{IMG}"
        digits = [tok.encode(c)[0] for c in f"{h}*{w}"]
        assert ids == [151849] + tok.encode(text) + [151852] + digits + [151851]
        pad = len(row) - len(ids)
        assert (row[:pad] == 151643).all() and mask.tolist() == [0] * pad + [1] * len(ids)


def test_mode_u_prompts(processor, tok, vq, image_processor):
    from transformers.models.emu3.image_processing_emu3 import smart_resize

    images = [picture(64, 40, 1), picture(50, 120, 2)]
    questions = ["Please describe the image", "What colour is it?"]
    out = processor(questions, image=images, mode="U")
    for image, question, row, mask, size in zip(images, questions, out["input_ids"], out["attention_mask"],
                                                out["image_size"]):
        ref_h, ref_w = smart_resize(image.height, image.width, 8, PIXELS["min_pixels"], PIXELS["max_pixels"])
        codes = vq.encode(ms.Tensor(image_processor(image)["pixel_values"])).asnumpy()[0]
        h, w = codes.shape
        assert (h, w) == (ref_h // 8, ref_w // 8) == tuple(size)
        image_prompt = f"{BOI}{h}*{w}{IMG}"
        for r in range(h):
            image_prompt += "".join(f"<|visual token {c:06d}|>" for c in codes[r]) + EOL
        image_prompt += EOF + EOI
        expected = f"{BOS}You are a helpful assistant. USER: {image_prompt}{question}. ASSISTANT:"
        ids = unpadded(row, mask)
        assert tok.decode(ids) == expected
        assert ids == tok.encode(expected)
        visual = [i - 151854 for i in ids if 151854 <= i < 151854 + 32768]
        assert visual == codes.reshape(-1).tolist()
    assert out["attention_mask"][:, -1].all() and not out["attention_mask"].all()


def test_decode_turns_generated_ids_into_images(processor, tok, vq, image_processor):
    rng = np.random.default_rng(3)
    h, w = 3, 5
    codes = rng.integers(0, 32768, (h, w))
    prompt = processor("a cat", mode="G", ratio="5:3", image_area=960)
    assert prompt["image_size"].tolist() == [[h, w]]
    generated = []
    for row in codes:
        generated += [151854 + int(c) for c in row] + [tok.eol_token_id]
    generated += [tok.eof_token_id, tok.eoi_token_id, tok.eos_token_id, tok.pad_token_id]
    ids = np.concatenate([prompt["input_ids"][0], generated])

    parts = processor.decode(ids)
    assert [type(p) for p in parts] == [str, Image.Image, str]
    assert parts[0] == f"{BOS}a cat" and parts[2] == "<|extra_204|><|endoftext|>"
    pixels = vq.decode(ms.Tensor(codes[None].astype(np.int32)))
    expected = image_processor.postprocess(pixels)["pixel_values"][0]
    assert parts[1].size == (8 * w, 8 * h)
    np.testing.assert_array_equal(np.asarray(parts[1]), np.asarray(expected))

    # BAAI's conventions: batch_decode is decode per row; skip_special_tokens=True gives the text
    # alone (the visual tokens are special tokens too; the "H*W" header is ordinary text).
    [again] = processor.batch_decode(ids[None])
    assert [type(p) for p in again] == [str, Image.Image, str] and again[0] == parts[0]
    assert processor.batch_decode(ms.Tensor(ids[None]), skip_special_tokens=True) == [f"a cat{h}*{w}"]
    assert processor.decode(ids, skip_special_tokens=True) == f"a cat{h}*{w}"

    short = np.concatenate([prompt["input_ids"][0], generated[:w + 1 + 2]])  # cut inside row 2
    with pytest.raises(ValueError, match="complete grid"):
        processor.decode(short)
    # An id outside the vocabulary inside an image span would otherwise be skipped silently.
    for bad in (-1, len(tok)):
        broken = ids.copy()
        broken[len(prompt["input_ids"][0]) + 1] = bad
        with pytest.raises(ValueError, match=rf"ids \[{bad}\] are outside the vocabulary"):
            processor.decode(broken)
    with pytest.raises(ValueError, match="codes must be integers"):
        processor.decode_image(codes.astype(np.float32))


def test_prefix_constrained_fn_follows_the_rule(processor, tok):
    h, w = 2, 3
    fn = processor.build_prefix_constrained_fn(h, w)
    reference = build_prefix_constraint(h, w, tok)
    prompt = processor("x", mode="G", ratio="3:2", image_area=384)["input_ids"][0].tolist()
    assert prompt[-1] == tok.img_token_id
    visual = list(range(151854, 151854 + 32768))
    # As in BAAI's helper the eol test comes first, so past eos a multiple of w+1 still gives eol.
    expected = {1: visual, 3: visual, 4: [tok.eol_token_id], 8: [tok.eol_token_id], 9: [tok.eof_token_id],
                10: [tok.eoi_token_id], 11: [tok.eos_token_id], 12: [tok.eol_token_id], 13: [tok.pad_token_id],
                15: [tok.pad_token_id]}
    for offset, allowed in expected.items():
        ids = np.array(prompt + [0] * (offset - 1))
        assert list(fn(0, ids)) == allowed == list(reference(0, ids)), offset


@pytest.mark.parametrize("ratio", ["abc", "0:1", "1:0", "16/9", "16:9:1", "-1:2", ""])
def test_bad_ratio(processor, ratio):
    with pytest.raises(ValueError, match="ratio must be 'W:H'"):
        processor("a cat", mode="G", ratio=ratio)


def test_bad_inputs_fail_before_any_model_work(tok, image_processor, vq, monkeypatch):
    calls = []
    monkeypatch.setattr(vq, "encode", lambda *a: calls.append(a))
    processor = Emu3Processor(image_processor, vq, tok, context_length=300)

    for area in (0, -4096, 1.5, "big"):
        with pytest.raises(ValueError, match="image_area must be a positive"):
            processor("a cat", mode="G", image_area=area)
    with pytest.raises(ValueError, match="too small for ratio 16:9"):
        processor("a cat", mode="G", ratio="16:9", image_area=20)
    with pytest.raises(ValueError, match="context window is 300"):
        processor("a cat", mode="G", image_area=160 * 160)  # 20x20 tokens = 423 new tokens
    assert processor("a cat", mode="G", image_area=120 * 120)["image_size"].tolist() == [[15, 15]]

    with pytest.raises(ValueError, match="image 1 .*too small"):
        processor(["q", "q"], image=[picture(64, 64, 0), picture(4, 60, 0)], mode="U")
    with pytest.raises(ValueError, match="image 0 .*aspect ratio"):
        processor("q", image=picture(600, 20, 0), mode="U")
    with pytest.raises(ValueError, match="context window is 300"):
        processor("describe " * 300, image=picture(64, 64, 0), mode="U")
    with pytest.raises(ValueError, match="one image per text"):
        processor(["q1", "q2"], image=picture(64, 64, 0), mode="U")
    with pytest.raises(ValueError, match="needs an image"):
        processor("q", mode="U")
    with pytest.raises(ValueError, match="pass no image"):
        processor("q", image=picture(64, 64, 0), mode="G")
    with pytest.raises(ValueError, match="mode must be 'G'"):
        processor("q", mode="X")
    with pytest.raises(ValueError, match="text must be"):
        processor([], mode="G")
    assert calls == []


def test_a_ratio_per_prompt_and_tensors_as_baai_uses_them(processor, tok):
    texts = ["a cat", "a much longer prompt about a dog"]
    out = processor(texts, mode="G", ratio=["1:1", "2:1"], image_area=48 * 48, return_tensors="pt")
    sizes = [generation_size("1:1", 48 * 48), generation_size("2:1", 48 * 48)]
    assert isinstance(out.input_ids, ms.Tensor) and out.image_size.asnumpy().tolist() == [list(s) for s in sizes]
    for row, mask, text, (h, w) in zip(out.input_ids.asnumpy(), out["attention_mask"].asnumpy(), texts, sizes):
        assert tok.decode(unpadded(row, mask)) == f"{BOS}{text}{BOI}{h}*{w}{IMG}"
    # One ratio for all prompts is the list of that ratio.
    same = processor(texts, mode="G", ratio="2:1", image_area=48 * 48)
    listed = processor(texts, mode="G", ratio=["2:1", "2:1"], image_area=48 * 48, padding_side="left")
    for key in ("input_ids", "attention_mask", "image_size"):
        np.testing.assert_array_equal(same[key], listed[key])
    # The per-row constraint BAAI builds from image_size[:, 0] and [:, 1].
    fn = processor.build_prefix_constrained_fn(out.image_size[:, 0], out.image_size[:, 1])
    for row, (h, w) in enumerate(sizes):
        prompt = out.input_ids.asnumpy()[row].tolist()
        assert fn(row, np.array(prompt + [0] * w)) == [tok.eol_token_id]
        assert fn(row, np.array(prompt + [0] * ((w + 1) * h))) == [tok.eof_token_id]

    with pytest.raises(ValueError, match="one per prompt"):
        processor(texts, mode="G", ratio=["1:1"])
    with pytest.raises(ValueError, match="ratio must be 'W:H'"):
        processor(texts, mode="G", ratio=["1:1", "wide"])
    with pytest.raises(ValueError, match="padding_side must be 'left'"):
        processor(texts, mode="G", padding_side="right")
    with pytest.raises(ValueError, match="return_tensors must be one of"):
        processor(texts, mode="G", return_tensors="tf")
    with pytest.raises(AttributeError, match="no 'pixel_values' in this batch"):
        out.pixel_values


def test_padding_image_encodes_different_sizes_as_one_batch(processor, vq, image_processor):
    small, large = picture(48, 64, 1), picture(96, 72, 2)
    alone = processor(["q", "q"], image=[small, large], mode="U")
    padded = processor(["q", "q"], image=[small, large], mode="U", padding_image=True)
    np.testing.assert_array_equal(alone["image_size"], padded["image_size"])
    codes_alone = processor.encode_images([small, large])
    codes_padded = processor.encode_images([small, large], padding_image=True)
    # The largest image is not padded: its codes are the ones it gets alone.
    np.testing.assert_array_equal(codes_padded[1], codes_alone[1])
    # The smaller one: its pixels padded to the batch's size with 0 and encoded, cropped to its own grid.
    pixels = image_processor(small, return_tensors="np")["pixel_values"]
    big = image_processor(large, return_tensors="np")["pixel_values"]
    canvas = np.zeros_like(big)
    canvas[:, :, :pixels.shape[2], :pixels.shape[3]] = pixels
    expected = vq.encode(ms.Tensor(canvas)).asnumpy()[0][:pixels.shape[2] // 8, :pixels.shape[3] // 8]
    np.testing.assert_array_equal(codes_padded[0], expected)
    assert codes_padded[0].shape == codes_alone[0].shape
    assert processor.image_string(codes_padded[0]) in processor.tokenizer.decode(padded["input_ids"][0])
