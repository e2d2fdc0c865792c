"""KV-cached autoregressive generation for Emu3ForCausalLM: text, and images with CFG.

Speed design (the decode loop is where an image's 8193 tokens go):
- one static KV cache, preallocated for prompt + max_new_tokens (`model.init_cache`), held by the
  step and written in place (emu3.generation.cache);
- the prompt goes through `GenerationStep` once (prefill), then every token through the same `GenerationStep` with
  fixed shapes. In GRAPH mode that cell compiles once for the prefill and once per attention
  window of the cache (emu3.backend.cache_windows: on the CPU 256, 512, ... slots, at most 5 for
  Emu3's 9216-token context; on Ascend one), and for an image once more per window for the
  steps whose tokens are all forced; never per token: every per-step value (next ids, positions,
  cache slot, step number, finished rows) is a device tensor that the step returns for the next
  call, and the tables it reads (the image's forced tokens, the sampling uniforms) are uploaded once;
- an image step computes only the logits the constraint lets it choose: the visual tokens' rows
  of the lm_head where a visual token is due, none where every row's token is forced (eol, eof,
  eoi, eos, pad). The schedule is known before decoding, so the host picks the step's graph;
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

from emu3 import backend, checks
from emu3.generation.constraints import VISUAL, forced_tokens, image_start_offsets
from emu3.generation.guidance import classifier_free_guidance
from emu3.generation.sampling import apply_temperature, draw_uniforms, greedy, sample
from emu3.generation.visual_head import VisualHead

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
    parallel_window: None decodes one token per forward pass (BAAI's behaviour). An int w turns on
        parallel row decoding for images (emu3.generation.parallel_rows): row r of the image starts
        once row r-1 has w tokens, and every pass decides one token in each started row.
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
    parallel_window: int | None = None

    def validate(self) -> None:
        """Refuse values that would run silently wrong: NaN or infinite numbers, fractions where a
        count is needed, anything out of range."""
        checks.integer("max_new_tokens", self.max_new_tokens, low=1)
        if self.top_k is not None:
            checks.integer("top_k (0 or None: no top-k)", self.top_k, low=0)
        checks.real("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        checks.real("temperature (use do_sample=False for greedy)", self.temperature, low=0.0, low_open=True)
        if self.seed is not None:
            checks.integer("seed", self.seed, low=0)
        if self.guidance_scale is not None:
            checks.real("guidance_scale", self.guidance_scale, low=0.0)
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.mode not in (None, *backend.MODES):
            raise ValueError(f"mode must be None, 'pynative' or 'graph', got {self.mode!r}")
        if self.parallel_window is not None:
            checks.integer("parallel_window (None: sequential decoding)", self.parallel_window, low=1)

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0


# What a step computes after the layers, chosen on the host for each step (each is its own graph):
# the lm_head over the whole vocabulary (text), over the visual tokens only (an image step where
# some row's next token is a visual one; the other rows take their forced token), or no lm_head at
# all (every row's next token is forced: eol, eof, eoi, eos, pad). docs/generation.md shows why
# the image steps pick exactly the tokens that the full vocabulary would.
TEXT, VISUAL_STEP, FORCED_STEP = "text", "visual", "forced"


class GenerationStep(nn.Cell):
    """One forward through the cache plus the choice of the next token, for prefill and decode."""

    def __init__(self, model, cache, config: GenerationConfig, constrained: bool, eos_token_id: int,
                 pad_token_id: int):
        super().__init__()
        self.model = model
        self.cache = cache
        self.guidance_scale = config.guidance_scale if config.guided else None
        self.visual_head = VisualHead(model) if constrained else None
        self.do_sample = config.do_sample
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.top_p = config.top_p
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def construct(self, input_ids, position_ids, cache_position, attention_mask, step, unfinished, forced, uniforms,
                  window, kind):
        """`forced`: (steps, B) table of constraints.forced_tokens (read at `step`) for image steps;
        `uniforms`: (steps, B) sampling uniforms (read at `step`); `kind`: TEXT, VISUAL_STEP or
        FORCED_STEP, a Python constant."""
        row_uniforms = ops.gather(uniforms, step, 0)[0] if self.do_sample else None
        if kind == TEXT:
            tokens = self.choose(self.model.forward_cached(input_ids, position_ids, cache_position, attention_mask,
                                                           self.cache, window), row_uniforms)
        else:
            hidden = self.model.hidden_cached(input_ids, position_ids, cache_position, attention_mask, self.cache,
                                              window)
            # depend: a forced step uses no output of the layers, and GRAPH mode would otherwise
            # drop their cache writes with them.
            tokens = ops.depend(ops.gather(forced, step, 0)[0], hidden)
            if kind == VISUAL_STEP:
                tokens = ops.where(tokens == VISUAL, self.visual_tokens(hidden, row_uniforms), tokens)
        tokens = ops.where(unfinished, tokens, self.pad_token_id)
        unfinished = ops.logical_and(unfinished, tokens != self.eos_token_id)
        next_ids = tokens[:, None]
        if self.guidance_scale is not None:
            next_ids = ops.concat((next_ids, next_ids), 0)
        return tokens, next_ids, position_ids[:, -1:] + 1, cache_position[-1:] + 1, step + 1, unfinished

    def choose(self, logits, uniforms):
        """Guidance, then argmax or sampling (one uniform per row, (N,); None for greedy) over the
        columns of `logits` ((N, C), or with guidance (2N, C): conditional rows first): column ids."""
        scores = logits
        if self.guidance_scale is not None:
            scores = classifier_free_guidance(scores, self.guidance_scale)
        if not self.do_sample:
            return greedy(scores)
        return sample(apply_temperature(scores, self.temperature), uniforms, self.top_k, self.top_p)

    def visual_tokens(self, hidden, uniforms):
        """The visual token chosen from each row's last hidden state ((N or 2N, hidden))."""
        return self.visual_head.first + self.choose(self.visual_head(hidden), uniforms)


def _step_for(model, config, constrained, eos, pad, rows, max_length) -> GenerationStep:
    """The step for these settings, ready for a new generation: its cache emptied and, for an
    image, its visual rows copied from the model's current lm_head."""
    key = (id(model), config.guidance_scale if config.guided else None, constrained, config.do_sample,
           config.temperature, config.top_k, config.top_p, eos, pad, rows, max_length)
    if key not in _LAST_STEP:
        _LAST_STEP.clear()  # first, so the old cache is freed before the new one is allocated
        _LAST_STEP[key] = GenerationStep(model, model.init_cache(rows, max_length), config, constrained, eos, pad)
    step = _LAST_STEP[key]
    step.cache.reset()
    if constrained:
        step.visual_head.load(model.lm_head.weight)
    return step


def _as_prompt(ids, mask, name: str, vocab_size: int):
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty (batch, length) integer array, got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        # The embedding lookup would not fail: it would read a wrong or zero row.
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size}): values from {ids.min()} "
                         f"to {ids.max()}")
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


def _prompt_rows(input_ids, attention_mask, negative_input_ids, negative_attention_mask, pad, vocab_size):
    """The checked prompts (B, L) and the rows of one forward: the prompts, then the negative
    prompts if given, all left padded to one length (rows (R, L) and their attention mask)."""
    ids, mask = _as_prompt(input_ids, attention_mask, "input_ids", vocab_size)
    if negative_input_ids is None:
        return ids, ids, mask
    neg_ids, neg_mask = _as_prompt(negative_input_ids, negative_attention_mask, "negative_input_ids", vocab_size)
    if neg_ids.shape[0] != ids.shape[0]:
        raise ValueError(f"negative_input_ids has {neg_ids.shape[0]} rows, input_ids has {ids.shape[0]}: give one "
                         f"negative prompt per prompt.")
    length = max(ids.shape[1], neg_ids.shape[1])
    ids, mask = _left_pad(ids, mask, length, pad)
    neg_ids, neg_mask = _left_pad(neg_ids, neg_mask, length, pad)
    return ids, np.concatenate([ids, neg_ids]), np.concatenate([mask, neg_mask])


def _bucketed(rows, row_mask, slots: int, context: int, pad: int):
    """Rows left padded to a bucketed length and a cache length for `slots` slots after them:
    calls with nearby lengths reuse the compiled graphs. Extra prompt columns are masked padding;
    extra cache slots are never reached. Returns rows, mask, prompt length, cache length."""
    prompt_length = _round_up(rows.shape[1], _PROMPT_BUCKET)
    if prompt_length + slots > context:
        prompt_length = rows.shape[1]
    rows, row_mask = _left_pad(rows, row_mask, prompt_length, pad)
    return rows, row_mask, prompt_length, min(_round_up(prompt_length + slots, _CACHE_BUCKET), context)


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
    with backend.running_in(config.mode):
        return _generate(model, input_ids, attention_mask, config, negative_input_ids, negative_attention_mask,
                         image_size, progress, callback)


def _generate(model, input_ids, attention_mask, config, negative_input_ids, negative_attention_mask, image_size,
              progress, callback):
    model_config = model.config
    last_id = model_config.vocab_size - 1
    eos = checks.integer("eos_token_id", model_config.eos_token_id if config.eos_token_id is None
                         else config.eos_token_id, low=0, high=last_id)
    pad = checks.integer("pad_token_id", model_config.pad_token_id if config.pad_token_id is None
                         else config.pad_token_id, low=0, high=last_id)
    if config.guided and negative_input_ids is None:
        raise ValueError(f"guidance_scale={config.guidance_scale} needs negative_input_ids (the negative "
                         f"prompts, built with the processor in mode 'G' like the prompts).")
    if not config.guided and negative_input_ids is not None:
        raise ValueError("negative_input_ids were given but guidance_scale is not set: pass "
                         "GenerationConfig(guidance_scale=3.0, ...) to use classifier-free guidance.")
    ids, rows, row_mask = _prompt_rows(input_ids, attention_mask, negative_input_ids, negative_attention_mask, pad,
                                       model_config.vocab_size)
    batch = ids.shape[0]
    new = int(config.max_new_tokens)
    if rows.shape[1] + new > model_config.max_position_embeddings:
        raise ValueError(f"prompt ({rows.shape[1]}) + max_new_tokens ({new}) = {rows.shape[1] + new} exceeds the "
                         f"model's context window max_position_embeddings={model_config.max_position_embeddings}.")
    if config.parallel_window is not None:
        from emu3.generation import parallel_rows  # imported here: it builds on this module
        return parallel_rows.generate_rows(model, config, input_ids, ids, rows, row_mask, image_size, eos, pad,
                                           progress, callback)
    rows, row_mask, prompt_length, max_length = _bucketed(rows, row_mask, new, model_config.max_position_embeddings,
                                                          pad)

    # Tables with one row per cache slot (a bucketed shape); row t is read by the t-th new token.
    constrained = image_size is not None
    if constrained:
        sizes = _image_sizes(image_size, batch)
        forced = forced_tokens(image_start_offsets(ids, model_config.img_token_id), sizes[:, 0], sizes[:, 1],
                               max_length, model_config)
        kinds = [VISUAL_STEP if (row == VISUAL).any() else FORCED_STEP for row in forced[:new]]
    else:
        forced = np.zeros((1, batch), np.int32)
        kinds = [TEXT] * new
    uniforms = (draw_uniforms(config.seed, max_length, batch) if config.do_sample
                else np.zeros((1, batch), np.float32))

    step = _step_for(model, config, constrained, eos, pad, rows.shape[0], max_length)
    windows = backend.cache_windows(max_length)
    full_mask = ms.Tensor(np.concatenate([row_mask, np.ones((rows.shape[0], max_length - prompt_length), np.int32)],
                                         1))
    positions = np.clip(np.cumsum(row_mask, 1) - 1, 0, None).astype(np.int32)
    constants = (ms.Tensor(forced), ms.Tensor(uniforms))
    state = (ms.Tensor(rows), ms.Tensor(positions), ms.Tensor(np.arange(prompt_length, dtype=np.int32)))
    loop = (ms.Tensor(np.zeros(1, np.int32)), ms.Tensor(np.ones(batch, np.bool_)))

    generated = np.full((batch, new), pad, np.int32)
    finished = np.zeros(batch, bool)
    done = 0
    pending = []
    with tqdm(total=new, unit="tok", desc="generating", disable=not progress, dynamic_ncols=True) as bar:
        for index in range(new):
            last_slot = prompt_length - 1 + index  # the prefill fills slots [0, prompt_length)
            window = next(w for w in windows if w > last_slot)
            tokens, next_ids, next_positions, next_slot, counter, unfinished = step(
                *state, full_mask, *loop, *constants, window, kinds[index])
            state = (next_ids, next_positions, next_slot)
            loop = (counter, unfinished)
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
