"""Parallel row decoding of images (ZipAR, He et al., ICML 2025): several visual tokens per forward
pass, an opt-in mode of `generate` (`GenerationConfig(parallel_window=w)`).

Image tokens depend mostly on their neighbours, so row r need not wait for the whole of row r-1.
With window w, an image of H rows of W visual tokens and lag = min(w, W):
- Row r starts when row r-1 has `lag` visual tokens; from then on every pass advances each started
  row by one token. Row r's token c is decided at pass r*lag + c. Pass 0 is the prefill: its last
  position (the prompt's image token) decides token (0, 0).
- The rest of the image is forced by the prefix constraint and needs no pass: an eol after every
  row, then eof, eoi, eos. So an image takes (H-1)*lag + W passes, against (W+1)*H + 3 sequentially.
- A pass feeds, for each started row ("lane"), the token just before that row's next position, at
  its own raster position: token (r, c-1), decided by the previous pass, or for c = 0 the eol of
  row r-1, known in advance. A row's last pass feeds its last token (its next position, the eol,
  needs no choice); the image's last token is never fed.
- Raster positions are RoPE positions and cache slots: the token at offset o from the image token
  (offset 1 is token (0, 0); (r, c) is at r*(W+1) + c + 1, the eol of row r at (r+1)*(W+1)) goes
  to slot prompt_length - 1 + o at position (image token's position) + o. Each slot is written once.
- A fed token attends to every filled slot at a lower or equal raster position, tokens fed in the
  same pass included, and to nothing else: the attention mask of pass p is "slot filled by pass p".
- w >= W is sequential decoding: the same tokens (greedy, and sampled: the token at offset o is
  drawn with the uniform of the o-th new token, as in sequential decoding), H + 3 passes fewer.
Guidance runs both branches on the same schedule (the negative prompts' rows feed the same tokens).

Fixed shapes (one compiled graph per attention window, whatever the image size or the pass): every
pass has as many lanes as rows are ever started at once (about W/w + 1); a lane without a row feeds
a padding token into a scratch slot after the last attention window, which no query ever reads.
The per-pass schedule is a table on the device indexed by the pass number, and each pass feeds the
tokens the previous one returned, so the host only fetches tokens every few passes, as in
sequential decoding.
"""

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from tqdm.auto import tqdm

from emu3 import backend
from emu3.generation.constraints import VISUAL, image_start_offsets
from emu3.generation.generate import (_FETCH_EVERY, _LAST_STEP, VISUAL_STEP, GenerationStep, _bucketed, _image_sizes,
                                      _step_for)
from emu3.generation.sampling import draw_uniforms

# Fill pass of a slot that is never attended to (padding, slots not yet fed, scratch).
_NEVER = np.iinfo(np.int32).max


def image_passes(height: int, width: int, window: int | None) -> int:
    """Forward passes (the prefill included) for one h x w token image: (H-1)*min(w, W) + W with a
    window, (W+1)*H + 3 (one per token) without. With guidance each pass runs both branches."""
    if window is None:
        return (width + 1) * height + 3
    return (height - 1) * min(window, width) + width


class RowSchedule:
    """Which token each pass feeds and decides, for an h x w token image and window w.

    Offsets count from the prompt's image token as the prefix constraint does: token (r, c) is at
    r*(W+1) + c + 1, the eol of row r at (r+1)*(W+1); then eof, eoi, eos.
    """

    def __init__(self, height: int, width: int, window: int):
        self.height, self.width = int(height), int(width)
        self.lag = min(int(window), self.width)
        self.passes = image_passes(self.height, self.width, self.lag)
        self.length = (self.width + 1) * self.height + 3  # the image's new tokens, eos included
        row = self.width + 1
        started = [self._rows_at(p) for p in range(self.passes)]
        self.lanes = max(len(rows) for rows in started)
        # fed[p, lane]: the offset of the token that lane feeds at pass p (-1: no row). Rows started
        # at one pass are consecutive, so row r can keep lane r % lanes for its whole life.
        self.fed = np.full((self.passes, self.lanes), -1, np.int32)
        for p, rows in enumerate(started):
            for r in rows:
                self.fed[p, r % self.lanes] = r * row + p - r * self.lag
        self.fed[0] = -1  # the prefill feeds the prompt
        # The pass that fills each offset's slot (the image token's, offset 0, by the prefill).
        self.fed_at = np.full(self.length + 1, _NEVER, np.int32)
        self.fed_at[0] = 0
        passes = np.broadcast_to(np.arange(self.passes)[:, None], self.fed.shape)
        self.fed_at[self.fed[self.fed >= 0]] = passes[self.fed >= 0]
        # The pass after which each offset's token is known (eol with its row's last token, the
        # end of the image with the last pass).
        offsets = np.arange(1, self.length + 1)
        r, c = np.divmod(offsets - 1, row)
        self.known_at = np.where(c < self.width, r * self.lag + c, r * self.lag + self.width - 1)
        self.known_at[self.height * row:] = self.passes - 1

    def _rows_at(self, p: int) -> range:
        """The rows a pass feeds: those with 0 <= p - r*lag <= W. (The last row would reach W at
        pass `passes`, which does not exist: its last token is never fed.)"""
        first = max(0, -(-(p - self.width) // self.lag))
        return range(first, min(p // self.lag, self.height - 1) + 1)

    def passes_for(self, tokens: int) -> int:
        """Passes until the first `tokens` new tokens are known (a truncated image)."""
        return int(self.known_at[:min(tokens, self.length)].max()) + 1

    @property
    def fed_slots(self) -> int:
        """Slots after the prompt that some pass fills (the highest fed offset)."""
        return int(self.fed.max(initial=0))


class ParallelRowStep(nn.Cell):
    """One decode pass: a token per lane into the cache, then the GenerationStep's choice of the
    next visual token (guidance, the visual rows of the lm_head, sampling) for every lane."""

    def __init__(self, step: GenerationStep, batch: int):
        super().__init__()
        self.step = step
        self.batch = batch
        self.eol_token_id = step.model.config.eol_token_id
        self.pad_token_id = step.model.config.pad_token_id

    def construct(self, previous, pass_index, fed_table, fed_pass, image_positions, image_slot, scratch_slots,
                  row_length, uniforms, window):
        """previous (B, lanes): the tokens the last pass decided; pass_index (1,); fed_table
        (passes, lanes) = RowSchedule.fed; fed_pass (rows, slots): the pass that fills each slot;
        image_positions (rows, 1) and image_slot (1,): the image token's position and slot;
        scratch_slots (lanes,): where a lane without a row writes; row_length (1,) = W + 1;
        uniforms (steps, B). Returns this pass's tokens (B, lanes) and the next pass index."""
        fed = ops.gather(fed_table, pass_index, 0)[0]
        active = fed >= 0
        offsets = ops.maximum(fed, 0)
        # A lane feeds the token its row decided last pass, or at a row's start the eol before it.
        tokens = ops.where(offsets % row_length == 0, self.eol_token_id, previous)
        tokens = ops.where(active, tokens, self.pad_token_id)
        if self.step.guidance_scale is not None:
            tokens = ops.concat((tokens, tokens), 0)
        positions = image_positions + offsets
        slots = ops.where(active, image_slot + offsets, scratch_slots)
        mask = (fed_pass <= pass_index).astype(ms.int32)
        hidden = self.step.model.hidden_cached(tokens, positions, slots, mask, self.step.cache, window,
                                               all_positions=True)
        lane_uniforms = None
        if self.step.do_sample:
            # The token at offset o is drawn with the uniform of the o-th new token.
            lane_uniforms = ops.swapaxes(ops.gather(uniforms, offsets, 0), 0, 1).reshape(-1)
        # Every lane decides a visual token: the next token of a started row (a forced eol there is
        # discarded by the host), or nothing (a lane without a row, discarded too).
        chosen = self.step.visual_tokens(hidden.reshape(-1, hidden.shape[-1]), lane_uniforms)
        return chosen.reshape(self.batch, -1), pass_index + 1


def _parallel_step_for(step: GenerationStep, batch: int) -> ParallelRowStep:
    # Kept beside its GenerationStep, so that both are dropped together when that one is replaced.
    key = ("parallel rows", id(step))
    if key not in _LAST_STEP:
        _LAST_STEP[key] = ParallelRowStep(step, batch)
    return _LAST_STEP[key]


def _check_image(model_config, ids, image_size, batch):
    if image_size is None:
        raise ValueError("parallel_window decodes images row by row: give image_size=(height, width) in tokens.")
    sizes = _image_sizes(image_size, batch)
    if (sizes != sizes[0]).any():
        raise ValueError(f"parallel row decoding needs one image size for the whole batch, got {sizes.tolist()}: "
                         f"generate different sizes in separate calls.")
    if (image_start_offsets(ids, model_config.img_token_id) != 1).any():
        raise ValueError("parallel row decoding needs prompts that end with the image token (the processor's "
                         "mode 'G': ... boi, 'H*W', img).")
    return int(sizes[0, 0]), int(sizes[0, 1])


def _finish(image, new: int, eos: int, pad: int, filler: int):
    """The generated ids as sequential decoding returns them: the image, then `filler` (the
    constraint's padding) up to `new` tokens; after a row's eos only `pad`; cut where every row
    has ended."""
    ids = np.full((image.shape[0], max(new, image.shape[1])), filler, np.int32)
    ids[:, :image.shape[1]] = image
    ids = ids[:, :new]
    ended = np.cumsum(ids == eos, 1) > 0
    ids[np.pad(ended, ((0, 0), (1, 0)))[:, :-1]] = pad
    if ended[:, -1].all():
        ids = ids[:, :int(ended.argmax(1).max()) + 1]
    return ids


def generate_rows(model, config, input_ids, ids, rows, row_mask, image_size, eos, pad, progress, callback):
    """generate() with `config.parallel_window`: ids (B, L) the checked prompts, rows/row_mask the
    rows of one forward (with guidance the negative prompts after the prompts). `callback` gets
    the new ids known without a gap from the image's start (later rows run ahead of them)."""
    model_config = model.config
    batch = ids.shape[0]
    height, width = _check_image(model_config, ids, image_size, batch)
    schedule = RowSchedule(height, width, int(config.parallel_window))
    new = int(config.max_new_tokens)
    passes, lanes = schedule.passes_for(new), schedule.lanes
    context = model_config.max_position_embeddings
    rows, row_mask, prompt_length, max_length = _bucketed(rows, row_mask, schedule.fed_slots + lanes, context, pad)
    usable = max_length - lanes  # the scratch slots of the lanes without a row come last
    if prompt_length + schedule.fed_slots > usable:
        raise ValueError(f"prompt ({prompt_length}) + image ({schedule.fed_slots} slots) + {lanes} scratch slots "
                         f"exceed the context window max_position_embeddings={context}; use a larger "
                         f"parallel_window (fewer rows at once) or a shorter prompt.")

    step = _step_for(model, config, True, eos, pad, rows.shape[0], max_length)
    windows = backend.cache_windows(usable)

    def window_for(slot):
        return next(w for w in windows if w > slot)

    image_slot = prompt_length - 1
    fed_pass = np.full((rows.shape[0], max_length), _NEVER, np.int32)
    fed_pass[:, :prompt_length] = np.where(row_mask != 0, 0, _NEVER)
    fed_pass[:, image_slot + 1:image_slot + 1 + schedule.fed_slots] = schedule.fed_at[1:schedule.fed_slots + 1]
    positions = np.clip(np.cumsum(row_mask, 1) - 1, 0, None).astype(np.int32)
    uniforms = (draw_uniforms(config.seed, max_length, batch) if config.do_sample
                else np.zeros((1, batch), np.float32))

    out = np.full((batch, schedule.length), model_config.eol_token_id, np.int32)
    out[:, -3:] = [model_config.eof_token_id, model_config.eoi_token_id, model_config.eos_token_id]
    with tqdm(total=new, unit="tok", desc=f"generating (rows in parallel, window {schedule.lag})",
              disable=not progress, dynamic_ncols=True) as bar:
        # The prefill decides token (0, 0), a visual token (the step's forced table says so).
        first, *_ = step(ms.Tensor(rows), ms.Tensor(positions), ms.Tensor(np.arange(prompt_length, dtype=np.int32)),
                         ms.Tensor((fed_pass <= 0).astype(np.int32)), ms.Tensor(np.zeros(1, np.int32)),
                         ms.Tensor(np.ones(batch, np.bool_)), ms.Tensor(np.full((1, batch), VISUAL, np.int32)),
                         ms.Tensor(uniforms), window_for(image_slot), VISUAL_STEP)
        previous = np.zeros((batch, lanes), np.int32)
        previous[:, 0] = out[:, 0] = first.asnumpy()
        shown = _show(bar, schedule, new, 0, 0)
        parallel = _parallel_step_for(step, batch)
        constants = (ms.Tensor(schedule.fed), ms.Tensor(fed_pass), ms.Tensor(positions[:, -1:]),
                     ms.Tensor(np.array([image_slot], np.int32)),
                     ms.Tensor(np.arange(usable, max_length, dtype=np.int32)),
                     ms.Tensor(np.array([width + 1], np.int32)), ms.Tensor(uniforms))
        state = (ms.Tensor(previous), ms.Tensor(np.ones(1, np.int32)))
        pending = []
        for p in range(1, passes):
            tokens, counter = parallel(*state, *constants, window_for(image_slot + int(schedule.fed[p].max())))
            state = (tokens, counter)
            pending.append(tokens)
            if len(pending) == _FETCH_EVERY or p == passes - 1:
                chunk = ops.stack(pending, 0).asnumpy()
                for done, decided in zip(range(p + 1 - len(pending), p + 1), chunk):
                    _place(out, schedule, done, decided)
                shown = _show(bar, schedule, new, p, shown)
                pending = []
                if callback is not None:
                    known = int(np.argmin(np.append(schedule.known_at[:new] <= p, False)))
                    if callback(out[:, :known]):
                        return np.concatenate([np.asarray(input_ids), out[:, :known]], 1)
        bar.update(max(0, min(new, schedule.length) - shown))
    generated = _finish(out, new, eos, pad, model_config.pad_token_id)
    return np.concatenate([np.asarray(input_ids), generated], 1)


def _place(out, schedule, p, decided):
    """Write pass p's decided tokens (B, lanes) at their offsets (forced eols are left alone)."""
    offsets = schedule.fed[p] + 1
    visual = (schedule.fed[p] >= 0) & (offsets % (schedule.width + 1) != 0)
    out[:, offsets[visual] - 1] = decided[:, visual]


def _show(bar, schedule, new, p, shown):
    known = int((schedule.known_at[:new] <= p).sum())
    bar.update(known - shown)
    return known
