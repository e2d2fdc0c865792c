"""KV-cached autoregressive generation for Emu3ForCausalLM: text, and images with CFG.

Speed design (the decode loop is where an image's 8193 tokens go):
- one static KV cache, preallocated for prompt + max_new_tokens (`model.init_cache`), held by the
  step and written in place (emu3.generation.cache);
- the prompt goes through `GenerationStep` once (prefill), then every token through the same `GenerationStep` with
  fixed shapes. In GRAPH mode that cell compiles once for the prefill and once per attention
  window of the cache (emu3.backend.cache_windows: on the CPU 256, 512, ... slots, at most 5 for
  Emu3's 9216-token context; on Ascend one), never per token: every per-step value (next ids,
  positions, cache slot, step number, finished rows, constraint offsets) is a device tensor that
  the step returns for the next call;
- classifier-free guidance runs both branches in one forward of batch 2B: rows [0, B) are the
  prompts, rows [B, 2B) the negative prompts, each with its own rows of the cache. Both are left
  padded to one length so they share cache slots;
- guidance, the image constraint and sampling run on the device inside the step (guidance.py,
  constraints.py, sampling.py); the host only fetches the chosen tokens, every `_FETCH_EVERY` steps,
  to update the progress bar and stop when every row has finished.

The attention mask covers the whole cache from the start: generated slots are 1, and a query never
sees slots after its own, so the mask never changes during decoding.
"""

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from tqdm.auto import tqdm

from emu3 import backend
from emu3.generation.constraints import VISUAL_CODEBOOK_SIZE, ImagePrefixConstraint, image_start_offsets
from emu3.generation.guidance import classifier_free_guidance
from emu3.generation.sampling import apply_temperature, draw_uniforms, greedy, sample

_FETCH_EVERY = 16
_PROMPT_BUCKET = 64
_CACHE_BUCKET = 256

# The last step built, so repeated calls with one model, settings and cache size (a loop over
# prompts) compile once. Only one is kept: a step holds its model and its cache.
_LAST_STEP = {}


@dataclass
class GenerationConfig:
    """How to generate. Token ids left as None come from the model's config.

    mode: "pynative" or "graph" for this call; None follows the current MindSpore context.
    guidance_scale: classifier-free guidance strength (Emu3-Gen uses 3.0); needs negative prompts.
    seed: drives sampling (same seed, same tokens); None draws a fresh one.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    top_k: int | None = None
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None
    guidance_scale: float | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    mode: str | None = None

    def validate(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k is not None and int(self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no top-k), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0.0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.mode not in (None, *backend.MODES):
            raise ValueError(f"mode must be None, 'pynative' or 'graph', got {self.mode!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0


class GenerationStep(nn.Cell):
    """One forward through the cache plus the choice of the next token, for prefill and decode."""

    def __init__(self, model, cache, config: GenerationConfig, constrained: bool, eos_token_id: int,
                 pad_token_id: int):
        super().__init__()
        self.model = model
        self.cache = cache
        self.guidance_scale = config.guidance_scale if config.guided else None
        self.constraint = ImagePrefixConstraint(model.config) if constrained else None
        self.do_sample = config.do_sample
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.top_p = config.top_p
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def construct(self, input_ids, position_ids, cache_position, attention_mask, step, unfinished, offsets, heights,
                  widths, uniforms, window):
        logits = self.model.forward_cached(input_ids, position_ids, cache_position, attention_mask, self.cache,
                                           window)
        scores = logits
        if self.guidance_scale is not None:
            scores = classifier_free_guidance(scores, self.guidance_scale)
        if self.constraint is not None:
            scores, visual = self.constraint(scores, offsets, heights, widths)
        if not self.do_sample:
            tokens = greedy(scores)
        elif self.constraint is None:
            tokens = sample(apply_temperature(scores, self.temperature), ops.gather(uniforms, step, 0)[0],
                            self.top_k, self.top_p)
        else:
            # Only the visual tokens can have probability where a visual token is due (elsewhere
            # exactly one token is allowed: the argmax), so sampling looks at those 32768 columns
            # instead of the whole vocabulary: the same tokens, a 5.6x smaller top-k.
            columns = ops.narrow(scores, -1, self.constraint.first_visual, VISUAL_CODEBOOK_SIZE)
            sampled = self.constraint.first_visual + sample(
                apply_temperature(columns, self.temperature), ops.gather(uniforms, step, 0)[0], self.top_k,
                self.top_p)
            tokens = ops.where(visual, sampled, greedy(scores))
        tokens = ops.where(unfinished, tokens, self.pad_token_id)
        unfinished = ops.logical_and(unfinished, tokens != self.eos_token_id)
        next_ids = tokens[:, None]
        if self.guidance_scale is not None:
            next_ids = ops.concat((next_ids, next_ids), 0)
        return tokens, next_ids, position_ids[:, -1:] + 1, cache_position[-1:] + 1, step + 1, unfinished, offsets + 1


def _step_for(model, config, constrained, eos, pad, rows, max_length) -> GenerationStep:
    key = (id(model), config.guidance_scale if config.guided else None, constrained, config.do_sample,
           config.temperature, config.top_k, config.top_p, eos, pad, rows, max_length)
    if key not in _LAST_STEP:
        _LAST_STEP.clear()  # first, so the old cache is freed before the new one is allocated
        _LAST_STEP[key] = GenerationStep(model, model.init_cache(rows, max_length), config, constrained, eos, pad)
    return _LAST_STEP[key]


def _as_prompt(ids, mask, name: str):
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty (batch, length) integer array, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if mask is None:
        mask = np.ones_like(ids)
    mask = np.asarray(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"the attention mask of {name} has shape {mask.shape}, expected {ids.shape}")
    if not mask[:, -1].all():
        raise ValueError(f"{name} must be LEFT padded (the last column of its attention mask must be all 1); "
                         f"tokenize with padding_side='left'.")
    return ids.astype(np.int32), mask.astype(np.int32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _left_pad(ids, mask, length: int, pad_token_id: int):
    extra = length - ids.shape[1]
    return (np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_token_id),
            np.pad(mask, ((0, 0), (extra, 0)), constant_values=0))


def _image_sizes(image_size, batch: int):
    sizes = np.asarray(image_size, dtype=np.int64)
    if sizes.shape == (2,):
        sizes = np.broadcast_to(sizes, (batch, 2))
    if sizes.shape != (batch, 2) or (sizes < 1).any():
        raise ValueError(f"image_size must be (height, width) in tokens or one pair per prompt ({batch}, 2), "
                         f"each >= 1; got {np.asarray(image_size).tolist()}")
    return sizes.astype(np.int32)


def generate(model, input_ids, attention_mask=None, config: GenerationConfig | None = None,
             negative_input_ids=None, negative_attention_mask=None, image_size=None, progress: bool = True,
             callback=None):
    """Generate up to `config.max_new_tokens` tokens after each (left-padded) prompt.

    Returns np.ndarray (B, L + n): the prompts followed by the generated ids, n <= max_new_tokens
    (generation stops when every row has emitted eos; finished rows continue with pad).
    `image_size=(h, w)` (tokens; or one pair per row) constrains the output to an h x w image after
    each prompt's image token. `negative_input_ids` with `config.guidance_scale` turn on
    classifier-free guidance; the negative prompts are built like the prompts (mode "G").
    `callback(new_ids)` is called with the (B, n) ids generated so far each time the host fetches
    them (every `_FETCH_EVERY` tokens, and at the end); if it returns True, generation stops there
    and the ids so far are returned (a stop button, streaming previews).
    """
    config = config or GenerationConfig()
    config.validate()
    if config.mode is None:
        return _generate(model, input_ids, attention_mask, config, negative_input_ids, negative_attention_mask,
                         image_size, progress, callback)
    previous = backend.run_mode()
    backend.set_run_mode(config.mode)
    try:
        return _generate(model, input_ids, attention_mask, config, negative_input_ids, negative_attention_mask,
                         image_size, progress, callback)
    finally:
        backend.set_run_mode(previous)


def _generate(model, input_ids, attention_mask, config, negative_input_ids, negative_attention_mask, image_size,
              progress, callback):
    model_config = model.config
    eos = model_config.eos_token_id if config.eos_token_id is None else int(config.eos_token_id)
    pad = model_config.pad_token_id if config.pad_token_id is None else int(config.pad_token_id)
    ids, mask = _as_prompt(input_ids, attention_mask, "input_ids")
    batch = ids.shape[0]
    if config.guided:
        if negative_input_ids is None:
            raise ValueError(f"guidance_scale={config.guidance_scale} needs negative_input_ids (the negative "
                             f"prompts, built with the processor in mode 'G' like the prompts).")
        neg_ids, neg_mask = _as_prompt(negative_input_ids, negative_attention_mask, "negative_input_ids")
        if neg_ids.shape[0] != batch:
            raise ValueError(f"negative_input_ids has {neg_ids.shape[0]} rows, input_ids has {batch}: give one "
                             f"negative prompt per prompt.")
        length = max(ids.shape[1], neg_ids.shape[1])
        ids, mask = _left_pad(ids, mask, length, pad)
        neg_ids, neg_mask = _left_pad(neg_ids, neg_mask, length, pad)
        rows, row_mask = np.concatenate([ids, neg_ids]), np.concatenate([mask, neg_mask])
    elif negative_input_ids is not None:
        raise ValueError("negative_input_ids were given but guidance_scale is not set: pass "
                         "GenerationConfig(guidance_scale=3.0, ...) to use classifier-free guidance.")
    else:
        rows, row_mask = ids, mask

    new = int(config.max_new_tokens)
    if rows.shape[1] + new > model_config.max_position_embeddings:
        raise ValueError(f"prompt ({rows.shape[1]}) + max_new_tokens ({new}) = {rows.shape[1] + new} exceeds the "
                         f"model's context window max_position_embeddings={model_config.max_position_embeddings}.")
    # Shapes rounded up to buckets: calls with nearby lengths reuse the compiled graphs. Extra prompt
    # columns are masked padding; extra cache slots are never reached.
    context = model_config.max_position_embeddings
    prompt_length = _round_up(rows.shape[1], _PROMPT_BUCKET)
    if prompt_length + new > context:
        prompt_length = rows.shape[1]
    rows, row_mask = _left_pad(rows, row_mask, prompt_length, pad)
    max_length = min(_round_up(prompt_length + new, _CACHE_BUCKET), context)

    constrained = image_size is not None
    zeros = np.zeros(batch, np.int32)
    if constrained:
        sizes = _image_sizes(image_size, batch)
        offsets, heights, widths = image_start_offsets(ids, model_config.img_token_id), sizes[:, 0], sizes[:, 1]
    else:
        offsets, heights, widths = zeros, zeros, zeros
    # One row of uniforms per cache slot (a bucketed shape); row t drives the t-th new token.
    uniforms = (draw_uniforms(config.seed, max_length, batch) if config.do_sample
                else np.zeros((1, batch), np.float32))

    step = _step_for(model, config, constrained, eos, pad, rows.shape[0], max_length)
    step.cache.reset()
    windows = backend.cache_windows(max_length)
    full_mask = ms.Tensor(np.concatenate([row_mask, np.ones((rows.shape[0], max_length - prompt_length), np.int32)],
                                         1))
    positions = np.clip(np.cumsum(row_mask, 1) - 1, 0, None).astype(np.int32)
    constants = (ms.Tensor(heights), ms.Tensor(widths), ms.Tensor(uniforms))
    state = (ms.Tensor(rows), ms.Tensor(positions), ms.Tensor(np.arange(prompt_length, dtype=np.int32)))
    loop = (ms.Tensor(np.zeros(1, np.int32)), ms.Tensor(np.ones(batch, np.bool_)), ms.Tensor(offsets))

    generated = np.full((batch, new), pad, np.int32)
    finished = np.zeros(batch, bool)
    done = 0
    pending = []
    with tqdm(total=new, unit="tok", desc="generating", disable=not progress, dynamic_ncols=True) as bar:
        for index in range(new):
            last_slot = prompt_length - 1 + index  # the prefill fills slots [0, prompt_length)
            window = next(w for w in windows if w > last_slot)
            tokens, next_ids, next_positions, next_slot, counter, unfinished, next_offsets = step(
                *state, full_mask, *loop, *constants, window)
            state = (next_ids, next_positions, next_slot)
            loop = (counter, unfinished, next_offsets)
            pending.append(tokens)
            if len(pending) == _FETCH_EVERY or index == new - 1:
                chunk = ops.stack(pending, 1).asnumpy()
                pending = []
                generated[:, done:done + chunk.shape[1]] = chunk
                fetched = chunk.shape[1]
                for offset in range(chunk.shape[1]):
                    finished |= chunk[:, offset] == eos
                    if finished.all():
                        fetched = offset + 1
                        break
                done += fetched
                bar.update(fetched)
                stop = callback is not None and callback(generated[:, :done])
                if stop or finished.all():
                    return np.concatenate([np.asarray(input_ids), generated[:, :done]], 1)
    return np.concatenate([np.asarray(input_ids), generated], 1)
