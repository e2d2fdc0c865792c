"""The Emu3 image-token constraint: exactly h rows of w visual tokens, each row closed by eol,
then eof, eoi, eos, then padding.

What is allowed depends only on the offset of the next token from the prompt's image token
(`<|image token|>`, the last token of a mode "G" prompt): offset % (w+1) == 0 -> eol;
(w+1)h+1 -> eof; +2 -> eoi; +3 -> eos; beyond -> pad; otherwise one of the 32768 visual tokens.
Every class but the visual one allows exactly one token.

`build_prefix_constraint` is that rule as a python `prefix_allowed_tokens_fn(batch_id, input_ids)`
(transformers' convention; the reference in tests and what the processor hands out); it carries its
image sizes, so transformers-style `generate` recognises it and runs the device version instead.
`forced_tokens` is the same rule as a table for the decode loop: the token each row must emit at
each step, or VISUAL where one of the visual tokens is due. The offsets advance by one per step, so
the whole schedule is known before decoding starts: the host picks each step's graph from it and
the device reads its row (emu3.generation.generate).
"""

import numpy as np

VISUAL_CODEBOOK_SIZE = 32768
# In a forced_tokens table: any visual token may come here (no token id is negative).
VISUAL = -1

# Offset classes.
_VISUAL, _EOL, _EOF, _EOI, _EOS, _PAD = range(6)


def visual_token_ids(config) -> np.ndarray:
    """The ids of `<|visual token k|>`, k < 32768: they follow eoi in Emu3's vocabulary."""
    first = config.eoi_token_id + 1
    if first + VISUAL_CODEBOOK_SIZE > config.vocab_size:
        raise ValueError(
            f"The image constraint needs the {VISUAL_CODEBOOK_SIZE} visual tokens after eoi "
            f"({config.eoi_token_id}), but vocab_size is {config.vocab_size}; use Emu3's full vocabulary "
            f"(184622) for image generation."
        )
    return np.arange(first, first + VISUAL_CODEBOOK_SIZE)


def _check_image_size(height: int, width: int) -> None:
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be at least 1x1 tokens, got height={height}, width={width}")


def _offset_classes(offsets, heights, widths) -> np.ndarray:
    """The class of each offset (numpy arrays that broadcast together)."""
    offsets, heights, widths = np.broadcast_arrays(offsets, heights, widths)
    end = (widths + 1) * heights
    return np.select([offsets % (widths + 1) == 0, offsets == end + 1, offsets == end + 2, offsets == end + 3,
                      offsets > end + 3], [_EOL, _EOF, _EOI, _EOS, _PAD], _VISUAL)


def _class_tokens(config) -> np.ndarray:
    """The token of each offset class (VISUAL for the visual class)."""
    return np.array([VISUAL, config.eol_token_id, config.eof_token_id, config.eoi_token_id, config.eos_token_id,
                     config.pad_token_id], np.int64)


class ImagePrefixAllowedTokens:
    """`prefix_allowed_tokens_fn(batch_id, input_ids) -> list[int]` for h x w token images.

    `heights` / `widths`: one size for every row, or one per row (BAAI's convention: a sequence of
    length 1 applies to every row). `input_ids` is one row so far (prompt + generated, numpy, MindSpore
    or torch); its first image token marks where the image starts. The returned lists are shared:
    don't modify them. `image_sizes(batch)` tells the decode loop the sizes, so it can run the same
    rule on the device instead of calling this per row and token.
    """

    def __init__(self, heights, widths, config):
        self.heights, self.widths = _sizes(heights, "height"), _sizes(widths, "width")
        if self.heights.size != self.widths.size:
            raise ValueError(f"give as many heights as widths, got {self.heights.size} and {self.widths.size}")
        for h, w in zip(self.heights, self.widths):
            _check_image_size(h, w)
        self.img_token_id = config.img_token_id
        self.token_ids = constraint_token_ids(config)
        self.allowed = [visual_token_ids(config).tolist()] + [[int(token)] for token in _class_tokens(config)[1:]]

    def image_sizes(self, batch: int) -> np.ndarray:
        """(batch, 2) int32 (height, width) of each row."""
        if self.heights.size not in (1, batch):
            raise ValueError(f"the prefix constraint has {self.heights.size} image sizes for {batch} rows: give "
                             f"one size, or one per row")
        sizes = np.stack([self.heights, self.widths], 1)
        return np.broadcast_to(sizes, (batch, 2)).astype(np.int32)

    def __call__(self, batch_id, input_ids):
        ids = input_ids.asnumpy() if hasattr(input_ids, "asnumpy") else np.asarray(input_ids)
        where = np.flatnonzero(ids == self.img_token_id)
        if where.size == 0:
            raise ValueError(
                f"row {batch_id} has no image token ({self.img_token_id}): the image constraint needs a "
                f"generation prompt ending in boi, 'H*W', img (the processor's mode 'G')."
            )
        row = int(batch_id) if self.heights.size > 1 else 0
        return self.allowed[int(_offset_classes(ids.shape[0] - int(where[0]), self.heights[row], self.widths[row]))]


def constraint_token_ids(config) -> tuple:
    """The ids the constraint depends on (the visual ones follow eoi): two configs with the same
    tuple constrain alike."""
    return (config.img_token_id, config.eol_token_id, config.eof_token_id, config.eoi_token_id, config.eos_token_id,
            config.pad_token_id)


def _sizes(values, name: str) -> np.ndarray:
    values = values.asnumpy() if hasattr(values, "asnumpy") else np.asarray(values)
    if values.ndim > 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"image {name} must be an integer or a sequence of integers (one per row), "
                         f"got {values.tolist()}")
    return values.reshape(-1).astype(np.int64)


def build_prefix_constraint(height, width, config) -> ImagePrefixAllowedTokens:
    """A `prefix_allowed_tokens_fn` forcing an h x w token image (or one size per row)."""
    return ImagePrefixAllowedTokens(height, width, config)


def image_start_offsets(input_ids: np.ndarray, img_token_id: int) -> np.ndarray:
    """(B,) offset of the first token to generate from each row's first image token."""
    has_img = input_ids == img_token_id
    missing = np.flatnonzero(~has_img.any(-1))
    if missing.size:
        raise ValueError(
            f"rows {missing.tolist()} have no image token ({img_token_id}); image generation needs prompts "
            f"ending in boi, 'H*W', img (build them with the processor in mode 'G')."
        )
    return (input_ids.shape[1] - has_img.argmax(-1)).astype(np.int32)


def forced_tokens(offsets, heights, widths, steps: int, config) -> np.ndarray:
    """(steps, B) int32: row t holds the token each row must emit as its t-th new token, or VISUAL
    where a visual token is due. offsets, heights, widths: (B,) as for `build_prefix_constraint`
    (the offset of the first new token)."""
    visual_token_ids(config)  # the vocabulary check
    offsets = np.asarray(offsets)[None] + np.arange(steps)[:, None]
    return _class_tokens(config)[_offset_classes(offsets, np.asarray(heights), np.asarray(widths))].astype(np.int32)
