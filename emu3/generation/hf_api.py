"""transformers-style `generate` for Emu3ForCausalLM: the calls of BAAI's scripts, run by emu3.generation.

`Emu3ForCausalLM.generate(input_ids, generation_config=None, logits_processor=None, **kwargs)` takes
transformers' arguments (`max_new_tokens`, `max_length`, `do_sample`, `top_k`, `top_p`, `temperature`,
`guidance_scale`, `negative_prompt_ids`, `negative_prompt_attention_mask`, `eos_token_id`,
`pad_token_id`, `prefix_allowed_tokens_fn`, `attention_mask`, a `logits_processor` list) and returns
the prompts followed by the new tokens, as transformers does; extra: `seed` (sampling) and `mode`.

Two ways to run a call:
- the fast path, emu3.generation.generate (one compiled step; guidance, the image constraint and
  sampling on the device), for the processors BAAI's image_generation.py builds:
  UnbatchedClassifierFreeGuidanceLogitsProcessor (or `guidance_scale` + `negative_prompt_ids`) and a
  PrefixConstrainedLogitsProcessor / `prefix_allowed_tokens_fn` holding emu3's image constraint
  (`Emu3Processor.build_prefix_constrained_fn`). They are recognised by class name and attributes,
  so transformers' own classes are recognised too, without importing transformers;
- the host path, for any other processor or prefix function (a Python callable): one token at a
  time through the KV cache, each processor called on the host with MindSpore tensors
  (`processor(input_ids, scores) -> scores`). Slower, same rules: processors in transformers' order
  (guidance from the arguments, then the prefix function, then the list; a listed processor of the
  same kind replaces the one the arguments build), then temperature, top-k, top-p.

Deliberate differences from transformers, each with a clear error or a note in docs/inference.md:
one sequence per prompt (no beams), a single eos id, `max_length` that leaves no room for a new
token is an error (transformers generates one), new tokens are capped at the context window (and,
with the image constraint, at the image's length), and unconditional prompts without a mask are
masked where they hold padding (transformers attends to it).
"""

import dataclasses
import logging

import numpy as np
import mindspore as ms
from mindspore import ops

from emu3 import backend
from emu3.generation.constraints import ImagePrefixAllowedTokens, constraint_token_ids
from emu3.generation.generate import GenerationConfig as Emu3GenerationConfig
from emu3.generation.generate import _prompt_rows
from emu3.generation.generate import generate as emu3_generate
from emu3.generation.guidance import classifier_free_guidance
from emu3.generation.sampling import apply_temperature, draw_uniforms, greedy, sample

logger = logging.getLogger("emu3")

# transformers' GenerationConfig fields this API honours, with transformers' defaults.
TRANSFORMERS_DEFAULTS = dict(max_length=20, max_new_tokens=None, do_sample=False, temperature=1.0, top_k=50,
                             top_p=1.0, guidance_scale=None, eos_token_id=None, pad_token_id=None,
                             bos_token_id=None, num_beams=1, num_return_sequences=1, use_cache=True)
# Ours on top: `seed` for sampling (transformers uses torch's global generator), `mode` per call.
EXTENSIONS = dict(seed=None, mode=None)
CALL_ARGUMENTS = ("attention_mask", "negative_prompt_ids", "negative_prompt_attention_mask",
                  "prefix_allowed_tokens_fn")
# transformers' bookkeeping in GenerationConfig.to_diff_dict(), not settings.
_BOOKKEEPING = {"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"}


class GenerationConfig:
    """transformers' GenerationConfig for the fields this port supports, with transformers' defaults
    (max_length 20, top_k 50, greedy). An unsupported field is an error, not silently ignored."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(TRANSFORMERS_DEFAULTS) - set(EXTENSIONS))
        if unknown:
            raise TypeError(f"GenerationConfig got unsupported field(s) {unknown}; supported: "
                            f"{sorted(TRANSFORMERS_DEFAULTS) + sorted(EXTENSIONS)}")
        self._set = dict(kwargs)
        for name, default in {**TRANSFORMERS_DEFAULTS, **EXTENSIONS}.items():
            setattr(self, name, kwargs.get(name, default))

    def to_diff_dict(self) -> dict:
        """The fields given explicitly (transformers: the ones that differ from the defaults)."""
        return dict(self._set)

    def __repr__(self) -> str:
        return f"GenerationConfig({', '.join(f'{k}={v!r}' for k, v in self._set.items())})"


class LogitsProcessorList(list):
    """transformers' LogitsProcessorList: processors applied in order."""


class UnbatchedClassifierFreeGuidanceLogitsProcessor:
    """transformers' classifier-free guidance processor (the one BAAI's image_generation.py builds):
    s * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond), where uncond comes from
    `model` run on `unconditional_ids` (default: the prompts' last token, as in transformers).
    `Emu3ForCausalLM.generate` runs both branches in one batch; the processor only carries the settings."""

    def __init__(self, guidance_scale, model, unconditional_ids=None, unconditional_attention_mask=None,
                 use_cache=True):
        self.guidance_scale = guidance_scale
        self.model = model
        # transformers' attribute layout, so that its instances and these read the same way.
        self.unconditional_context = {"input_ids": unconditional_ids, "attention_mask": unconditional_attention_mask,
                                      "use_cache": use_cache, "past_key_values": None, "first_pass": True}


class PrefixConstrainedLogitsProcessor:
    """transformers' PrefixConstrainedLogitsProcessor: only `prefix_allowed_tokens_fn(batch_id, ids)`
    may follow each row. Callable on the host: (B, L) ids and (B, V) scores -> masked scores."""

    def __init__(self, prefix_allowed_tokens_fn, num_beams: int = 1):
        if num_beams != 1:
            raise ValueError(f"num_beams={num_beams}: beam search is not supported, use num_beams=1")
        self._prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        self._num_beams = num_beams

    def __call__(self, input_ids, scores):
        ids = _numpy(input_ids)
        mask = np.full(tuple(scores.shape), -np.inf, np.float32)
        for row, sequence in enumerate(ids):
            allowed = list(self._prefix_allowed_tokens_fn(row, sequence))
            if not allowed:
                raise ValueError(f"prefix_allowed_tokens_fn allowed no token for row {row}: it must return at "
                                 f"least one id")
            mask[row, allowed] = 0.0
        return scores + ms.Tensor(mask)


def _numpy(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _is_guidance(processor) -> bool:
    return (type(processor).__name__ == "UnbatchedClassifierFreeGuidanceLogitsProcessor"
            and hasattr(processor, "unconditional_context"))


def _is_prefix(processor) -> bool:
    return (type(processor).__name__ == "PrefixConstrainedLogitsProcessor"
            and hasattr(processor, "_prefix_allowed_tokens_fn"))


def _settings(generation_config, kwargs: dict) -> dict:
    """transformers' defaults <- the generation config <- the call's keyword arguments."""
    if generation_config is None:
        given = {}
    elif isinstance(generation_config, Emu3GenerationConfig):
        given = dataclasses.asdict(generation_config)
    elif hasattr(generation_config, "to_diff_dict"):
        given = {k: v for k, v in generation_config.to_diff_dict().items() if k not in _BOOKKEEPING}
    elif hasattr(generation_config, "shape") or isinstance(generation_config, (list, tuple)):
        raise TypeError("generate()'s second positional argument is generation_config, as in transformers; "
                        "pass the mask as attention_mask=...")
    else:
        raise TypeError(f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}")
    unsupported = sorted(set(given) - set(TRANSFORMERS_DEFAULTS) - set(EXTENSIONS))
    if unsupported:
        raise ValueError(f"the generation config sets {unsupported}, which this port does not support; "
                         f"supported: {sorted(TRANSFORMERS_DEFAULTS) + sorted(EXTENSIONS)}")
    unknown = sorted(set(kwargs) - set(TRANSFORMERS_DEFAULTS) - set(EXTENSIONS) - set(CALL_ARGUMENTS))
    if unknown:
        raise TypeError(f"generate() got unsupported keyword argument(s) {unknown}; supported: "
                        f"{sorted(CALL_ARGUMENTS) + sorted(TRANSFORMERS_DEFAULTS) + sorted(EXTENSIONS)} "
                        f"and logits_processor")
    settings = {**TRANSFORMERS_DEFAULTS, **EXTENSIONS, **given,
                **{k: v for k, v in kwargs.items() if k not in CALL_ARGUMENTS}}
    if settings["num_beams"] != 1 or settings["num_return_sequences"] != 1:
        raise ValueError("beam search and several sequences per prompt are not supported: use num_beams=1 and "
                         "num_return_sequences=1")
    eos = settings["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"one eos_token_id is supported, got {list(eos)}")
        settings["eos_token_id"] = eos[0]
    return settings


def _default_mask(ids: np.ndarray, pad, eos) -> np.ndarray:
    """transformers' rule: mask the pad tokens if the pad id is set, present and not the eos id."""
    if pad is not None and pad != eos and (ids == pad).any():
        return (ids != pad).astype(np.int32)
    return np.ones_like(ids, dtype=np.int32)


def _classify(processor, model) -> tuple:
    if _is_guidance(processor):
        context = processor.unconditional_context
        if not context.get("first_pass", True):
            raise ValueError("this UnbatchedClassifierFreeGuidanceLogitsProcessor was already used by a generation: "
                             "build a new one for each call")
        if processor.model is not model:
            raise ValueError("the UnbatchedClassifierFreeGuidanceLogitsProcessor was built with another model than "
                             "the one generating: guidance by a second model is not supported")
        return "guidance", (processor.guidance_scale, context["input_ids"], context["attention_mask"])
    if _is_prefix(processor):
        if getattr(processor, "_num_beams", 1) != 1:
            raise ValueError("beam search is not supported: build PrefixConstrainedLogitsProcessor with num_beams=1")
        return "prefix", processor._prefix_allowed_tokens_fn
    if callable(processor):
        return "callable", processor
    raise TypeError(f"logits_processor holds a {type(processor).__name__}, which is not callable")


def _processors(model, settings, kwargs, logits_processor) -> list:
    """[(kind, value)] in transformers' order; kind is "guidance", "prefix" or "callable"."""
    defaults = []
    if settings["guidance_scale"] is not None and settings["guidance_scale"] != 1:
        defaults.append(("guidance", (settings["guidance_scale"], kwargs.get("negative_prompt_ids"),
                                      kwargs.get("negative_prompt_attention_mask"))))
    if kwargs.get("prefix_allowed_tokens_fn") is not None:
        defaults.append(("prefix", kwargs["prefix_allowed_tokens_fn"]))
    custom = [_classify(p, model) for p in logits_processor or ()]
    chain, used = [], set()
    for kind, value in defaults:
        # transformers: a listed processor of the kind the arguments build takes its place.
        match = next((i for i, (k, _) in enumerate(custom) if k == kind and i not in used), None)
        if match is None:
            chain.append((kind, value))
        else:
            logger.warning("generate(): the %s processor in logits_processor replaces the one from the arguments",
                           kind)
            chain.append(custom[match])
            used.add(match)
    chain += [entry for i, entry in enumerate(custom) if i not in used]
    if sum(kind == "guidance" for kind, _ in chain) > 1:
        raise ValueError("classifier-free guidance is given twice (two UnbatchedClassifierFreeGuidanceLogitsProcessor)")
    return chain


def _device_constraint(fn, config) -> bool:
    """Whether `fn` is emu3's image constraint over the model's ids (then the device runs it)."""
    return isinstance(fn, ImagePrefixAllowedTokens) and fn.token_ids == constraint_token_ids(config)


def _new_tokens(settings, ids, negative, chain, config) -> int:
    """max_new_tokens (or max_length - prompt), capped by the image to generate and the context window."""
    length = ids.shape[1]
    if settings["max_new_tokens"] is not None:
        new = int(settings["max_new_tokens"])
    else:
        new = int(settings["max_length"]) - length
        if new < 1:
            raise ValueError(f"max_length={settings['max_length']} leaves no room after the {length}-token prompt "
                             f"(transformers' default max_length is 20): pass max_new_tokens")
    if new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {new}")
    prefixes = [value for kind, value in chain if kind == "prefix"]
    if prefixes and isinstance(prefixes[0], ImagePrefixAllowedTokens):
        sizes = prefixes[0].image_sizes(ids.shape[0])
        # Every row has said eos after its image: nothing is generated past the longest.
        new = min(new, int(((sizes[:, 1] + 1) * sizes[:, 0]).max()) + 3)
    rows = max(length, 0 if negative is None else negative.shape[1])
    room = config.max_position_embeddings - rows
    if room < 1:
        raise ValueError(f"the prompt ({rows} tokens) fills the model's context window "
                         f"(max_position_embeddings={config.max_position_embeddings})")
    if new > room:
        logger.warning("generate(): max_new_tokens=%d capped at %d, the room left in the model's context window "
                       "(%d positions)", new, room, config.max_position_embeddings)
        new = room
    return new


def generate(model, input_ids, generation_config=None, logits_processor=None, **kwargs):
    """transformers' `model.generate(...)` for Emu3ForCausalLM (see the module docstring)."""
    settings = _settings(generation_config, kwargs)
    ids = _numpy(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    config = model.config
    eos = config.eos_token_id if settings["eos_token_id"] is None else int(settings["eos_token_id"])
    pad = config.pad_token_id if settings["pad_token_id"] is None else int(settings["pad_token_id"])
    mask = kwargs.get("attention_mask")
    mask = _default_mask(ids, pad, eos) if mask is None else _numpy(mask)

    chain = _processors(model, settings, kwargs, logits_processor)
    guidance = next((value for kind, value in chain if kind == "guidance"), None)
    negative = negative_mask = None
    if guidance is not None:
        _, negative, negative_mask = guidance
        if negative is None:  # transformers: the unconditional prompt is each prompt's last token
            negative, negative_mask = ids[:, -1:], np.ones((ids.shape[0], 1), np.int32)
        negative = _numpy(negative)
        negative_mask = _default_mask(negative, pad, eos) if negative_mask is None else _numpy(negative_mask)

    new = _new_tokens(settings, ids, negative, chain, config)
    prefixes = [value for kind, value in chain if kind == "prefix"]
    fast = (all(kind != "callable" for kind, _ in chain) and len(prefixes) <= 1
            and all(_device_constraint(fn, config) for fn in prefixes))
    if fast:
        out = emu3_generate(
            model, ids, mask,
            Emu3GenerationConfig(max_new_tokens=new, do_sample=bool(settings["do_sample"]), top_k=settings["top_k"],
                                 top_p=settings["top_p"], temperature=settings["temperature"],
                                 seed=settings["seed"], guidance_scale=guidance[0] if guidance else None,
                                 eos_token_id=eos, pad_token_id=pad, mode=settings["mode"]),
            negative_input_ids=negative, negative_attention_mask=negative_mask,
            image_size=prefixes[0].image_sizes(ids.shape[0]) if prefixes else None)
    else:
        with backend.running_in("pynative"):  # the processors run on the host between steps
            out = _host_loop(model, ids, mask, settings, chain, negative, negative_mask, new, eos, pad)
    out = out.astype(ids.dtype)
    return ms.Tensor(out) if isinstance(input_ids, ms.Tensor) else out


def _host_loop(model, ids, mask, settings, chain, negative, negative_mask, new, eos, pad):
    """One token at a time through a KV cache, the processors called on the host."""
    # Rows and masks as the fast path builds them (its checks included): prompts, then the
    # unconditional prompts, left padded to one length.
    _, rows, row_mask = _prompt_rows(ids, mask, negative, negative_mask, pad, model.config.vocab_size)
    batch, length = ids.shape[0], rows.shape[1]
    cache = model.init_cache(rows.shape[0], length + new)
    cache.reset()
    full_mask = ms.Tensor(np.concatenate([row_mask, np.ones((rows.shape[0], new), np.int32)], 1))
    positions = np.clip(np.cumsum(row_mask, 1) - 1, 0, None).astype(np.int32)
    logits = model.forward_cached(ms.Tensor(rows), ms.Tensor(positions), ms.Tensor(np.arange(length, dtype=np.int32)),
                                  full_mask, cache)
    steps = [(kind, PrefixConstrainedLogitsProcessor(value) if kind == "prefix" else value) for kind, value in chain]
    uniforms = draw_uniforms(settings["seed"], new, batch) if settings["do_sample"] else None
    sequences = ids.astype(np.int64)
    unfinished = np.ones(batch, bool)
    last = positions[:, -1:]
    for t in range(new):
        scores = logits if negative is None else ops.split(logits, batch, 0)[0]
        for kind, value in steps:
            if kind == "guidance":
                scores = classifier_free_guidance(ops.concat((scores, ops.split(logits, batch, 0)[1]), 0), value[0])
            else:
                scores = value(ms.Tensor(sequences), scores)
                scores = scores if isinstance(scores, ms.Tensor) else ms.Tensor(np.asarray(scores, np.float32))
        if settings["do_sample"]:
            tokens = sample(apply_temperature(scores, settings["temperature"]), ms.Tensor(uniforms[t]),
                            settings["top_k"], settings["top_p"])
        else:
            tokens = greedy(scores)
        tokens = np.where(unfinished, tokens.asnumpy(), pad)
        unfinished &= tokens != eos
        sequences = np.concatenate([sequences, tokens[:, None]], 1)
        if not unfinished.any() or t == new - 1:
            break
        step_ids = tokens if negative is None else np.concatenate([tokens, tokens])
        last = last + 1
        logits = model.forward_cached(ms.Tensor(step_ids[:, None].astype(np.int32)), ms.Tensor(last),
                                      ms.Tensor(np.array([length + t], np.int32)), full_mask, cache)
    return sequences
