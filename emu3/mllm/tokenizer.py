"""Emu3's text tokenizer: tiktoken over the Qwen BPE vocabulary plus Emu3's special and visual tokens.

A BAAI Emu3-Gen / Emu3-Chat directory holds three tokenizer files:
- `emu3.tiktoken`: the Qwen BPE vocabulary, one `base64(token bytes) rank` pair a line (151,643 ranks);
- `emu3_vision_tokens.txt`: one token a line: `<|image token|>`, `<|image start|>`, `<|image end|>`,
  then `<|visual token 000000|>` ... `<|visual token 032767|>`;
- `tokenizer_config.json`: which special token plays which role (bos, eos, pad, img, boi, eoi, eol, eof).

Special ids are consecutive from 151643: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
`<|extra_0|>` ... `<|extra_204|>`, then the vision tokens in file order (vocabulary 184,622).
Special tokens written inside a text are recognised as such, and text is NFC-normalised first,
as BAAI's tokenizer does.
"""

import base64
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken

from emu3.weights import read_json

VOCAB_FILE = "emu3.tiktoken"
VISION_TOKENS_FILE = "emu3_vision_tokens.txt"
CONFIG_FILE = "tokenizer_config.json"

# Qwen's pre-tokenisation: contractions, letter runs, single digits, punctuation, whitespace.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_SPECIAL_ID = 151643
NUM_EXTRA_TOKENS = 205
TEXT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS)
)
VISUAL_TOKEN_TEMPLATE = "<|visual token {:06d}|>"

# Roles of special tokens, as named in BAAI's tokenizer_config.json, and their surface forms.
DEFAULT_ROLES = {
    "bos_token": "<|extra_203|>",
    "eos_token": "<|extra_204|>",
    "pad_token": "<|endoftext|>",
    "img_token": "<|image token|>",
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "eol_token": "<|extra_200|>",
    "eof_token": "<|extra_201|>",
}


def vision_token_names(codebook_size: int = 32768) -> list[str]:
    """The lines of `emu3_vision_tokens.txt` for a vision tokenizer with this codebook size."""
    return [DEFAULT_ROLES["img_token"], DEFAULT_ROLES["boi_token"], DEFAULT_ROLES["eoi_token"]] + [
        VISUAL_TOKEN_TEMPLATE.format(k) for k in range(codebook_size)
    ]


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(
                f"{path} line {number} is not 'base64-token rank': {line[:60]!r}; "
                f"{VOCAB_FILE} must be a tiktoken BPE file (Qwen's vocabulary)"
            ) from None
    return ranks


class Emu3Tokenizer:
    """Text <-> ids for Emu3, with BAAI's id layout; pads on the left by default (for generation)."""

    def __init__(self, vocab_file, special_tokens_file, padding_side: str = "left",
                 errors: str = "replace", **roles):
        unknown = set(roles) - set(DEFAULT_ROLES)
        if unknown:
            raise TypeError(f"unknown token roles {sorted(unknown)}; known: {sorted(DEFAULT_ROLES)}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.vocab_file = Path(vocab_file)
        self.special_tokens_file = Path(special_tokens_file)
        for path in (self.vocab_file, self.special_tokens_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"tokenizer file {path} not found: an Emu3 model directory needs {VOCAB_FILE} and "
                    f"{VISION_TOKENS_FILE} (as in BAAI's Emu3-Gen / Emu3-Chat)"
                )
        self.padding_side = padding_side
        self.errors = errors
        self.roles = {**DEFAULT_ROLES, **roles}

        ranks = _read_ranks(self.vocab_file)
        if len(ranks) != FIRST_SPECIAL_ID:
            raise ValueError(
                f"{self.vocab_file} has {len(ranks)} BPE ranks; Emu3 expects Qwen's {FIRST_SPECIAL_ID}"
            )
        vision = [t.strip() for t in self.special_tokens_file.read_text(encoding="utf-8").splitlines()]
        names = TEXT_SPECIAL_TOKENS + tuple(t for t in vision if t)
        self.special_tokens = {name: FIRST_SPECIAL_ID + i for i, name in enumerate(names)}
        missing = [t for t in self.roles.values() if t not in self.special_tokens]
        if missing or VISUAL_TOKEN_TEMPLATE.format(0) not in self.special_tokens:
            raise ValueError(
                f"{self.special_tokens_file} lacks the tokens {missing or [VISUAL_TOKEN_TEMPLATE.format(0)]}"
            )
        self._encoding = tiktoken.Encoding(
            "emu3", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.codebook_size = sum(1 for t in vision if t.startswith("<|visual token "))
        self._visual_base = self.special_tokens[VISUAL_TOKEN_TEMPLATE.format(0)]
        # bos_token / bos_token_id, and the same for eos, pad, img, boi, eoi, eol, eof.
        for role, token in self.roles.items():
            setattr(self, role, token)
            setattr(self, role + "_id", self.special_tokens[token])

    @classmethod
    def from_pretrained(cls, directory, padding_side: str = "left") -> "Emu3Tokenizer":
        """Load from a BAAI model directory (emu3.tiktoken, emu3_vision_tokens.txt, tokenizer_config.json).

        Padding is on the left unless asked otherwise (generation needs it there), whatever
        tokenizer_config.json says.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        config = {}
        if (directory / CONFIG_FILE).is_file():
            config = read_json(directory / CONFIG_FILE, "the tokenizer's configuration")
        roles = {}
        for role in DEFAULT_ROLES:
            value = config.get(role)
            # transformers may store a token as an AddedToken dict.
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                roles[role] = value
        return cls(directory / VOCAB_FILE, directory / VISION_TOKENS_FILE, padding_side=padding_side,
                   errors=config.get("errors", "replace"), **roles)

    def save_pretrained(self, directory) -> None:
        """Write the three tokenizer files in BAAI's layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.vocab_file.resolve() != (directory / VOCAB_FILE).resolve():
            shutil.copyfile(self.vocab_file, directory / VOCAB_FILE)
        vision = [t for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])
                  if i >= FIRST_SPECIAL_ID + len(TEXT_SPECIAL_TOKENS)]
        (directory / VISION_TOKENS_FILE).write_text("".join(t + "\n" for t in vision), encoding="utf-8")
        config = {
            **self.roles,
            "tokenizer_class": "Emu3Tokenizer",
            "padding_side": self.padding_side,
            "errors": self.errors,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- vocabulary -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def convert_tokens_to_ids(self, token: str) -> int:
        """The id of a special token given by its surface form, e.g. "<|image start|>"."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of this tokenizer")
        return self.special_tokens[token]

    def visual_token_id(self, k: int) -> int:
        """The id of visual token k (codebook entry k of the vision tokenizer)."""
        if not 0 <= k < self.codebook_size:
            raise ValueError(f"visual token index {k} outside the codebook [0, {self.codebook_size})")
        return self._visual_base + k

    def is_visual(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self._visual_base) & (ids < self._visual_base + self.codebook_size)

    # ---- text -> ids ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of one text; special tokens written in the text become their ids; no bos is added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def __call__(self, texts, padding="longest", return_tensors: str | None = "np") -> dict:
        """Encode one text or a batch: {"input_ids", "attention_mask"}, padded with pad_token_id.

        padding: "longest" pads every row to the longest one on `padding_side`; False leaves rows
        as they are (then return_tensors must be None unless all rows have one length).
        return_tensors: "np" for int32 (B, L) arrays, None for lists of lists.
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", True, False):
            raise ValueError(f"padding must be 'longest' or False, got {padding!r}")
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        rows = [self.encode(t) for t in texts]
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max(len(r) for r in rows)
            for i, row in enumerate(rows):
                fill = width - len(row)
                if self.padding_side == "left":
                    rows[i], masks[i] = [self.pad_token_id] * fill + row, [0] * fill + masks[i]
                else:
                    rows[i], masks[i] = row + [self.pad_token_id] * fill, masks[i] + [0] * fill
        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": masks}
        if len({len(r) for r in rows}) > 1:
            raise ValueError("rows of different lengths cannot form an array: use padding='longest'")
        return {"input_ids": np.array(rows, dtype=np.int32), "attention_mask": np.array(masks, dtype=np.int32)}

    # ---- ids -> text ------------------------------------------------------------------------
    def id_list(self, ids) -> list[int]:
        """ids (a list, numpy array or MindSpore tensor) as a flat list of ints, each checked to be an
        integer inside the vocabulary."""
        if hasattr(ids, "asnumpy"):  # a MindSpore tensor
            ids = ids.asnumpy()
        array = np.asarray(ids)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            # Converting would truncate 3.7 to 3 and read True as 1: a wrong text with no error.
            raise ValueError(f"token ids must be integers, got {array.dtype} values such as "
                             f"{array.reshape(-1)[0]!r}")
        ids = array.astype(np.int64).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {len(self)})")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids; with skip_special_tokens every id from 151643 on is dropped."""
        ids = self.id_list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < FIRST_SPECIAL_ID]
        return self._encoding.decode(ids, errors=self.errors)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "asnumpy"):
            sequences = sequences.asnumpy()
        return [self.decode(s, skip_special_tokens) for s in sequences]
