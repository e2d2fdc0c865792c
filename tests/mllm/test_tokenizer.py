"""Emu3Tokenizer against the id layout of BAAI's Emu3 and an independent byte-pair encoder.

The vocabulary is the real Qwen BPE file that the dashscope wheel ships (Emu3's emu3.tiktoken).
The oracle below re-implements BPE from the definition (split with Qwen's pattern, then merge the
lowest-ranked adjacent pair until none is mergeable) without tiktoken.
"""

import base64
import json
import unicodedata

import numpy as np
import pytest
import regex

from emu3.mllm.tokenizer import CONFIG_FILE, VISION_TOKENS_FILE, VOCAB_FILE, Emu3Tokenizer
from tests.mllm.tokenizer_files import qwen_vocab_file, write_tokenizer_files

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TEXTS = [
    "Hello, world!",
    "a portrait of young girl. masterpiece, film grained, best quality.",
    "Please describe the image in 2024 words, e.g. 3.14159 and 1,000,000.",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n\nend  ",
    "I'm sure they'll say it's fine; we've DONE it, you'd agree?",
    "中文文本：一只猫坐在垫子上。日本語のテキスト、한국어 텍스트",
    "emoji 🐱🚀 and accents: café naïve Ångström",
    "code: def f(x): return x**2  # comment\n",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("emu3_tokenizer"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Emu3Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ranks():
    out = {}
    for line in qwen_vocab_file().read_bytes().splitlines():
        token, rank = line.split()
        out[base64.b64decode(token)] = int(rank)
    return out


def bpe_oracle(text: str, ranks: dict, specials: dict) -> list[int]:
    ids = []
    # Every Emu3 special token has the form <|...|>.
    for piece in regex.split(r"(<\|[^<>|]*\|>)", unicodedata.normalize("NFC", text)):
        if piece in specials:
            ids.append(specials[piece])
            continue
        for chunk in regex.findall(QWEN_PATTERN, piece):
            parts = [bytes([b]) for b in chunk.encode("utf-8")]
            while len(parts) > 1:
                pair_ranks = [ranks.get(parts[j] + parts[j + 1]) for j in range(len(parts) - 1)]
                candidates = [(r, j) for j, r in enumerate(pair_ranks) if r is not None]
                if not candidates:
                    break
                _, j = min(candidates)
                parts[j:j + 2] = [parts[j] + parts[j + 1]]
            ids.extend(ranks[p] for p in parts)
    return ids


def test_special_token_ids_follow_baai_layout(tok):
    # Ids from BAAI's tokenizer (facts file): specials are consecutive from 151643.
    assert len(tok) == tok.vocab_size == 184622
    assert tok.pad_token_id == 151643 and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    for k in (0, 7, 199, 202, 204):
        assert tok.convert_tokens_to_ids(f"<|extra_{k}|>") == 151646 + k
    assert (tok.eol_token_id, tok.eof_token_id) == (151846, 151847)
    assert (tok.bos_token_id, tok.eos_token_id) == (151849, 151850)
    assert (tok.img_token_id, tok.boi_token_id, tok.eoi_token_id) == (151851, 151852, 151853)
    assert tok.codebook_size == 32768
    for k in (0, 1, 12345, 32767):
        assert tok.visual_token_id(k) == 151854 + k
        assert tok.convert_tokens_to_ids(f"<|visual token {k:06d}|>") == 151854 + k
    with pytest.raises(ValueError, match="outside the codebook"):
        tok.visual_token_id(32768)


def test_encode_matches_independent_bpe(tok, ranks):
    for text in TEXTS:
        assert tok.encode(text) == bpe_oracle(text, ranks, tok.special_tokens), text


def test_digits_are_split_singly(tok):
    ids = tok.encode("year 20240 has 5 digits")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == ["2", "0", "2", "4", "0", "5"]


def test_special_tokens_inside_text(tok, ranks):
    text = "a cat<|image start|>90*90<|image token|><|visual token 000007|><|extra_200|>x<|extra_204|>"
    ids = tok.encode(text)
    assert ids == bpe_oracle(text, ranks, tok.special_tokens)
    for token_id in (151852, 151851, 151854 + 7, 151846, 151850):
        assert token_id in ids
    assert ids[ids.index(151852) + 1:ids.index(151851)] == [tok.encode(c)[0] for c in "90*90"]


def test_nfc_normalisation(tok):
    decomposed = "cafe\u0301 A\u030angstro\u0308m"
    assert decomposed != unicodedata.normalize("NFC", decomposed)
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))


def test_round_trip(tok):
    texts = TEXTS + ["<|extra_203|>prompt<|image start|>3*4<|image token|><|visual token 032767|><|image end|>"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.decode(np.array(tok.encode(TEXTS[0]), dtype=np.int32)) == TEXTS[0]


def test_batch_left_padding_and_mask(tok, tokenizer_dir):
    texts = ["short", "a much longer text with several tokens", "mid size text"]
    out = tok(texts, padding="longest", return_tensors="np")
    lengths = [len(tok.encode(t)) for t in texts]
    width = max(lengths)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
    assert out["input_ids"].dtype == np.int32
    for row, mask, text, n in zip(out["input_ids"], out["attention_mask"], texts, lengths):
        assert row[width - n:].tolist() == tok.encode(text)
        assert (row[:width - n] == tok.pad_token_id).all()
        assert mask.tolist() == [0] * (width - n) + [1] * n

    right = Emu3Tokenizer.from_pretrained(tokenizer_dir, padding_side="right")(texts, return_tensors=None)
    assert right["input_ids"][0] == tok.encode("short") + [tok.pad_token_id] * (width - lengths[0])
    with pytest.raises(ValueError, match="padding='longest'"):
        tok(texts, padding=False, return_tensors="np")


def test_batch_decode_skips_special_tokens(tok):
    texts = ["<|extra_203|>hello<|image start|>1*1<|image token|><|visual token 000005|><|extra_200|>"
             "<|extra_201|><|image end|><|extra_204|>", "plain answer"]
    ids = tok(texts)["input_ids"]
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["hello1*1", "plain answer"]
    decoded = tok.batch_decode(ids)
    assert decoded[0] == texts[0]
    assert decoded[1] == "<|endoftext|>" * (ids.shape[1] - len(tok.encode(texts[1]))) + texts[1]


def test_save_and_reload(tok, tokenizer_dir, tmp_path):
    tok.save_pretrained(tmp_path)
    for name in (VOCAB_FILE, VISION_TOKENS_FILE):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["bos_token"] == "<|extra_203|>" and config["padding_side"] == "left"
    again = Emu3Tokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens
    assert again.encode(TEXTS[5]) == tok.encode(TEXTS[5])
    # transformers-style entries (AddedToken dicts, right padding) still give Emu3's roles, left padded.
    config.update(bos_token={"content": "<|extra_203|>", "special": True}, padding_side="right")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    again = Emu3Tokenizer.from_pretrained(tmp_path)
    assert again.bos_token_id == 151849 and again.padding_side == "left"


def test_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="emu3.tiktoken"):
        Emu3Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 184622])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(123)
    bad = write_tokenizer_files(tmp_path / "bad")
    (bad / CONFIG_FILE).write_text('{"bos_token": "<|extra_203|>",')
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE} is not valid JSON"):
        Emu3Tokenizer.from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("ids, message", [
    ([5, -1], r"ids \[-1\] are outside the vocabulary \[0, 184622\)"),
    (np.array([-7, 3]), r"ids \[-7\] are outside the vocabulary"),
    (np.array([3.7, 5.0]), r"token ids must be integers, got float64"),
    ([True, False], r"token ids must be integers, got bool"),
])
def test_decode_refuses_ids_that_are_not_vocabulary_entries(tok, ids, message):
    with pytest.raises(ValueError, match=message):
        tok.decode(ids)
    with pytest.raises(ValueError, match=message):
        tok.batch_decode(np.asarray(ids)[None])
