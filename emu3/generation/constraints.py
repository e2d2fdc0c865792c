"""The Emu3 image-token constraint: exactly h rows of w visual tokens, each row closed by eol,
then eof, eoi, eos, then padding.

What is allowed depends only on the offset of the next token from the prompt's image token
(`<|image token|>`, the last token of a mode "G" prompt): offset % (w+1) == 0 -> eol;
(w+1)h+1 -> eof; +2 -> eoi; +3 -> eos; beyond -> pad; otherwise one of the 32768 visual tokens.

`build_prefix_constraint` is that rule as a python `prefix_allowed_tokens_fn(batch_id, input_ids)`
(transformers' convention; the reference in tests and what the processor hands out); it carries its
image sizes, so transformers-style `generate` recognises it and runs the device version instead.
`ImagePrefixConstraint` is the same rule on the device for the decode loop: the offset of each row
selects one of six precomputed additive masks, so a step costs one gather and one add.
"""

import numpy as np
import mindspore as ms
from mindspore import nn, ops

VISUAL_CODEBOOK_SIZE = 32768

# Offset classes, in the order of the rows of ImagePrefixConstraint's mask table.
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


def _offset_class(offset: int, height: int, width: int) -> int:
    end = (width + 1) * height
    if offset % (width + 1) == 0:
        return _EOL
    if offset == end + 1:
        return _EOF
    if offset == end + 2:
        return _EOI
    if offset == end + 3:
        return _EOS
    if offset > end + 3:
        return _PAD
    return _VISUAL


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
        self.allowed = {
            _VISUAL: visual_token_ids(config).tolist(),
            _EOL: [config.eol_token_id],
            _EOF: [config.eof_token_id],
            _EOI: [config.eoi_token_id],
            _EOS: [config.eos_token_id],
            _PAD: [config.pad_token_id],
        }

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
        height, width = int(self.heights[row]), int(self.widths[row])
        return self.allowed[_offset_class(ids.shape[0] - int(where[0]), height, width)]


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


class ImagePrefixConstraint(nn.Cell):
    """The constraint on the device: (B, V) scores + the additive mask of each row's offset class."""

    def __init__(self, config):
        super().__init__()
        table = np.full((6, config.vocab_size), -np.inf, dtype=np.float32)
        table[_VISUAL, visual_token_ids(config)] = 0.0
        for cls, token in ((_EOL, config.eol_token_id), (_EOF, config.eof_token_id),
                           (_EOI, config.eoi_token_id), (_EOS, config.eos_token_id),
                           (_PAD, config.pad_token_id)):
            table[cls, token] = 0.0
        self.masks = ms.Tensor(table)
        self.first_visual = int(visual_token_ids(config)[0])

    def construct(self, scores, offsets, heights, widths):
        """offsets, heights, widths: (B,) int32; offsets as in `build_prefix_constraint`.

        Returns the masked scores and whether each row's next token is a visual one (every other
        class allows exactly one token).
        """
        end = (widths + 1) * heights
        cls = ops.zeros_like(offsets)
        cls = ops.where(offsets > end + 3, _PAD, cls)
        cls = ops.where(offsets == end + 3, _EOS, cls)
        cls = ops.where(offsets == end + 2, _EOI, cls)
        cls = ops.where(offsets == end + 1, _EOF, cls)
        cls = ops.where(offsets % (widths + 1) == 0, _EOL, cls)
        return scores + ops.gather(self.masks, cls, 0), cls == _VISUAL
