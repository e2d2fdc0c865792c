"""Emu3Processor: prompts for image generation (mode "G") and understanding (mode "U"), and back.

The prompts follow BAAI's Emu3 processor character for character:
- mode G: `bos + text + boi + "{H}*{W}" + img`, where H x W (in tokens) comes from the ratio "W:H"
  and the pixel area: `round(side * sqrt(area / (W * H)) / 8)` with Python's half-to-even round.
- mode U: `bos + "You are a helpful assistant. USER: {image}{text}. ASSISTANT:"`, where {image} is
  `boi + "{h}*{w}" + img + (w visual tokens + eol) * h + eof + eoi` for the image's codes.
Every check on the user's input (ratio, area, image size, prompt length against the context
window) happens before the vision tokenizer or the language model runs.
"""

import re

import mindspore as ms
import numpy as np
from PIL import Image

from emu3.generation.constraints import build_prefix_constraint
from emu3.mllm.tokenizer import VISUAL_TOKEN_TEMPLATE

CHAT_TEMPLATE = "You are a helpful assistant. USER: {image_prompt}{text_prompt}. ASSISTANT:"
SIZE_TEMPLATE = "{H}*{W}"
_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
RETURN_TENSORS = ("np", "ms", "pt", None)


class BatchFeature(dict):
    """The processor's output: a dict whose keys also read as attributes (`inputs.input_ids`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this batch; it holds {sorted(self)}") from None


def parse_ratio(ratio: str) -> tuple[int, int]:
    """'W:H' -> (W, H), both positive integers."""
    match = _RATIO.match(ratio) if isinstance(ratio, str) else None
    if match is None or int(match[1]) == 0 or int(match[2]) == 0:
        raise ValueError(
            f"ratio must be 'W:H' with two positive integers (width first), e.g. '1:1', '16:9' or '3:4'; "
            f"got {ratio!r}"
        )
    return int(match[1]), int(match[2])


def generation_size(ratio: str, image_area: int, spatial_factor: int = 8) -> tuple[int, int]:
    """(H, W) in tokens of an image of about `image_area` pixels with width:height `ratio`."""
    width, height = parse_ratio(ratio)
    if isinstance(image_area, bool) or not isinstance(image_area, (int, np.integer)) or image_area <= 0:
        raise ValueError(f"image_area must be a positive number of pixels (e.g. 518400 = 720*720), got {image_area!r}")
    # Same expression and order as BAAI's, so the float rounding (half to even) agrees exactly.
    scale = (image_area / (width * height)) ** 0.5
    th = int(round(height * scale / spatial_factor))
    tw = int(round(width * scale / spatial_factor))
    if th < 1 or tw < 1:
        raise ValueError(
            f"image_area {image_area} is too small for ratio {ratio}: the image would be {th}x{tw} tokens of "
            f"{spatial_factor}x{spatial_factor} pixels; each side needs at least 1 token, use a larger image_area"
        )
    return th, tw


def image_tokens_to_generate(height: int, width: int) -> int:
    """New tokens for an h x w image after the prompt's img token: rows + eol, then eof, eoi, eos."""
    return (width + 1) * height + 3


class Emu3Processor:
    """Text and images -> prompt ids for Emu3; generated ids -> text and PIL images.

    `context_length` (the language model's max_position_embeddings) lets the processor refuse a
    prompt, or an image to generate, that cannot fit; without it lengths are not checked.
    """

    def __init__(self, image_processor, vision_tokenizer, tokenizer, context_length: int | None = None):
        self.image_processor = image_processor
        self.vision_tokenizer = vision_tokenizer
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.spatial_factor = vision_tokenizer.config.spatial_factor
        if vision_tokenizer.config.codebook_size != tokenizer.codebook_size:
            raise ValueError(
                f"the vision tokenizer's codebook has {vision_tokenizer.config.codebook_size} entries but the "
                f"text tokenizer has {tokenizer.codebook_size} visual tokens: they come from different models"
            )

    # ---- prompts ----------------------------------------------------------------------------
    def __call__(self, text, image=None, mode: str = "G", ratio="1:1", image_area: int = 518400,
                 padding="longest", return_tensors: str | None = "np", padding_image: bool = False,
                 padding_side: str | None = None) -> "BatchFeature":
        """Prompt ids for one text or a batch (left padded): {"input_ids", "attention_mask", "image_size"},
        readable as keys or attributes (`inputs.input_ids`, as BAAI's scripts do).

        mode "G": text-to-image prompts; `ratio` is one "W:H" for every prompt or a list, one per prompt;
        the size in tokens comes from the ratio and `image_area`.
        mode "U": one image (PIL.Image) per text; the image's tokens go into the chat template. With
        `padding_image`, images of different sizes are padded to the largest and encoded as one batch
        (BAAI's option: faster; the tokens near a padded edge can differ from encoding alone).
        image_size is (B, 2): the (H, W) in tokens of the image to generate / the given image.
        return_tensors: "np" (int32 arrays), "ms" (MindSpore tensors; "pt", what BAAI's scripts pass,
        gives MindSpore tensors too: this port has no PyTorch) or None (lists).
        padding_side: only "left" (what generation needs, and the tokenizer's default) is accepted.
        """
        texts = [text] if isinstance(text, str) else list(text) if text is not None else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {list(RETURN_TENSORS)}, got {return_tensors!r}")
        if padding_side not in (None, "left"):
            raise ValueError(f"padding_side must be 'left' (generation continues after the last column), "
                             f"got {padding_side!r}")
        if mode == "G":
            if image is not None:
                raise ValueError("mode 'G' generates an image from text: pass no image "
                                 "(use mode 'U' to ask about one)")
            sizes = [generation_size(r, image_area, self.spatial_factor) for r in self._ratios(ratio, len(texts))]
            prompts = [self.tokenizer.bos_token + t + self.image_header(h, w) for t, (h, w) in zip(texts, sizes)]
            self._check_fits(prompts, [image_tokens_to_generate(h, w) for h, w in sizes],
                             [f"the {h}x{w}-token image to generate" for h, w in sizes])
        elif mode == "U":
            images = self._image_list(image, len(texts))
            sizes = [self._token_size(img, i) for i, img in enumerate(images)]
            # Visual tokens and eols are special tokens, so they never merge with the text around
            # them: the prompt's length is known before the vision tokenizer runs.
            skeletons = [self._understanding_prompt(t, self.image_header(h, w) + self.tokenizer.eof_token
                                                    + self.tokenizer.eoi_token)
                         for t, (h, w) in zip(texts, sizes)]
            f = self.spatial_factor
            self._check_fits(skeletons, [h * (w + 1) for h, w in sizes],
                             [f"the image's {h}x{w} tokens (it is resized to {f * w}x{f * h} pixels; a smaller "
                              f"image gives fewer)" for h, w in sizes])
            codes = self.encode_images(images, padding_image)
            prompts = [self._understanding_prompt(t, self.image_string(c)) for t, c in zip(texts, codes)]
        else:
            raise ValueError(f"mode must be 'G' (generate an image) or 'U' (understand an image), got {mode!r}")
        out = self.tokenizer(prompts, padding=padding, return_tensors=None if return_tensors is None else "np")
        out["image_size"] = np.array(sizes, dtype=np.int32) if return_tensors else [list(s) for s in sizes]
        if return_tensors in ("ms", "pt"):
            out = {key: ms.Tensor(value) for key, value in out.items()}
        return BatchFeature(out)

    @staticmethod
    def _ratios(ratio, count: int) -> list:
        if isinstance(ratio, str):
            return [ratio] * count
        ratios = list(ratio) if isinstance(ratio, (list, tuple)) else None
        if ratios is None or len(ratios) != count:
            raise ValueError(f"ratio must be one 'W:H' string or a list of them, one per prompt: got {ratio!r} for "
                             f"{count} prompt(s)")
        return ratios

    def image_header(self, height: int, width: int) -> str:
        tok = self.tokenizer
        return tok.boi_token + SIZE_TEMPLATE.format(H=height, W=width) + tok.img_token

    def image_string(self, codes) -> str:
        """The token string of an image given its (h, w) codes."""
        codes = np.asarray(codes)
        tok = self.tokenizer
        rows = ["".join(VISUAL_TOKEN_TEMPLATE.format(int(c)) for c in row) + tok.eol_token for row in codes]
        return self.image_header(*codes.shape) + "".join(rows) + tok.eof_token + tok.eoi_token

    def _understanding_prompt(self, text: str, image_prompt: str) -> str:
        return self.tokenizer.bos_token + CHAT_TEMPLATE.format(image_prompt=image_prompt, text_prompt=text)

    def _image_list(self, image, count: int) -> list:
        images = [image] if isinstance(image, Image.Image) else image
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, Image.Image) for i in images):
            raise ValueError("mode 'U' needs an image: a PIL.Image.Image or a list of them, one per text")
        if len(images) != count:
            raise ValueError(f"mode 'U' needs one image per text: got {len(images)} images for {count} texts")
        return list(images)

    def _token_size(self, image: Image.Image, index: int) -> tuple[int, int]:
        width, height = image.size
        try:
            h, w = self.image_processor.smart_resize(height, width)
        except ValueError as err:
            raise ValueError(f"image {index} ({width}x{height} pixels) cannot be tokenised: {err}") from None
        return h // self.spatial_factor, w // self.spatial_factor

    def _check_fits(self, prompts: list[str], extras: list[int], whats: list[str]) -> None:
        if self.context_length is None:
            return
        for i, (prompt, more, what) in enumerate(zip(prompts, extras, whats)):
            total = len(self.tokenizer.encode(prompt)) + more
            if total > self.context_length:
                raise ValueError(
                    f"prompt {i} needs {total} tokens (text plus {what}) but the model's context window is "
                    f"{self.context_length} (max_position_embeddings): shorten the text or use a smaller "
                    f"image / image_area"
                )

    # ---- images <-> tokens --------------------------------------------------------------------
    def encode_image(self, image: Image.Image) -> np.ndarray:
        """(h, w) int codes of one image through the image processor and the vision tokenizer."""
        pixels = self.image_processor(image, return_tensors="np")["pixel_values"]
        return self.vision_tokenizer.encode(ms.Tensor(pixels)).asnumpy()[0]

    def encode_images(self, images: list, padding_image: bool = False) -> list:
        """The (h, w) codes of each image: one by one, or with `padding_image` (and different sizes)
        as one batch padded at the bottom and right with 0 (mid-grey after normalisation) and cropped back."""
        if not padding_image or len({img.size for img in images}) == 1:
            return [self.encode_image(img) for img in images]
        pixels = [self.image_processor(img, return_tensors="np")["pixel_values"][0] for img in images]
        height, width = max(p.shape[1] for p in pixels), max(p.shape[2] for p in pixels)
        batch = np.stack([np.pad(p, ((0, 0), (0, height - p.shape[1]), (0, width - p.shape[2]))) for p in pixels])
        codes = self.vision_tokenizer.encode(ms.Tensor(batch)).asnumpy()
        f = self.spatial_factor
        return [c[:p.shape[1] // f, :p.shape[2] // f] for c, p in zip(codes, pixels)]

    def decode_image(self, codes) -> Image.Image:
        """A PIL image from (h, w) codes."""
        codes = ms.Tensor(np.asarray(codes)[None])  # the vision tokenizer refuses non-integer codes
        pixels = self.vision_tokenizer.decode(codes).astype(ms.float32).asnumpy()
        return self.image_processor.postprocess(pixels)["pixel_values"][0]

    def build_prefix_constrained_fn(self, height, width):
        """transformers-style prefix_allowed_tokens_fn forcing an h x w image; height and width may be
        one per row (`inputs.image_size[:, 0]`, `[:, 1]`, as BAAI's image_generation.py passes them).
        `Emu3ForCausalLM.generate` recognises it and runs the rule on the device (generation.constraints)."""
        return build_prefix_constraint(height, width, self.tokenizer)

    # ---- ids -> text and images ---------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False):
        """One sequence back to text and images.

        skip_special_tokens=False: a list of the parts in order, str for text and PIL.Image for each
        boi ... eoi span (empty text parts left out). An image span must hold complete rows (w visual
        tokens + eol) matching its "H*W" header.
        skip_special_tokens=True: the text alone, a str: every special token goes, the visual ones
        included (BAAI's tokenizer counts them as special), so images are dropped.
        """
        tok = self.tokenizer
        if skip_special_tokens:
            return tok.decode(ids, skip_special_tokens=True)
        ids = tok.id_list(ids)
        parts, start = [], 0
        while start < len(ids):
            boi = ids.index(tok.boi_token_id, start) if tok.boi_token_id in ids[start:] else len(ids)
            self._append_text(parts, ids[start:boi])
            if boi == len(ids):
                break
            eoi = ids.index(tok.eoi_token_id, boi) if tok.eoi_token_id in ids[boi:] else len(ids)
            parts.append(self.decode_image(self._image_codes(ids[boi + 1:eoi])))
            start = eoi + 1
        return parts

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list:
        """`decode` of each row: lists of parts, or with skip_special_tokens=True one str per row."""
        if hasattr(sequences, "asnumpy"):
            sequences = sequences.asnumpy()
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def _append_text(self, parts: list, ids: list) -> None:
        text = self.tokenizer.decode(ids)
        if text:
            parts.append(text)

    def _image_codes(self, span: list) -> np.ndarray:
        """The (h, w) codes in the ids between boi and eoi: 'H*W', img, rows ended by eol, eof."""
        tok = self.tokenizer
        if tok.img_token_id not in span:
            raise ValueError("an image span (boi ... eoi) lacks its img token: not a well-formed Emu3 image")
        img = span.index(tok.img_token_id)
        header = tok.decode(span[:img])
        match = re.fullmatch(r"(\d+)\*(\d+)", header)
        rows, row = [], []
        for token in span[img + 1:]:
            if token == tok.eol_token_id:
                rows.append(row)
                row = []
            elif tok.is_visual(token):
                row.append(token - tok.visual_token_id(0))
        lengths = sorted({len(r) for r in rows})
        declared = (int(match[1]), int(match[2])) if match else None
        if row or len(lengths) != 1 or lengths[0] == 0 or (declared and declared != (len(rows), lengths[0])):
            raise ValueError(
                f"the image tokens do not form a complete grid: header {header!r}, {len(rows)} rows of "
                f"lengths {lengths}, {len(row)} tokens after the last eol (was generation cut short? "
                f"max_new_tokens must cover (W+1)*H+3 tokens)"
            )
        return np.array(rows, dtype=np.int32)
