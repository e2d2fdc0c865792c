"""The one place where CPU and Ascend differ.

Everything else in the package uses ops that have kernels on both devices. What lives here:
run-mode and device selection, dtype names, the few computations that have a fused Ascend
kernel but no CPU kernel (attention, RMSNorm), dropout (generator-based on Ascend; the CPU has
no such kernel), which collectives exist natively, and the vision tokenizer's Conv3d compute
dtype (Ascend's Conv3d takes fp16 only). Each computation has a plain fallback that is the
reference implementation on CPU and the numerical yardstick for the fused one.
"""

import logging
import math

import mindspore as ms
import numpy as np
from mindspore import mint, ops
from mindspore.common.generator import default_generator
from mindspore.ops.auto_generate.gen_ops_prim import dropout_gen_mask_ext_op

logger = logging.getLogger(__name__)

DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
ATTN_IMPLEMENTATIONS = ("eager", "flash_attention_2")


def device_target() -> str:
    return ms.get_context("device_target")


# Compiled graphs cannot query the context, but they read module globals as constants, so the
# device is resolved here in Python: at import and whenever set_run_mode() selects a device.
_ON_ASCEND = device_target() == "Ascend"
_GRAPH = ms.get_context("mode") == ms.GRAPH_MODE


def on_ascend() -> bool:
    return _ON_ASCEND


def native_collectives() -> bool:
    """Whether AlltoAll, ReduceScatter, AllGather's backward and groups smaller than the world exist
    (Ascend's HCCL). The CPU backend (mccl) has AllGather and AllReduce over the whole world only, so
    train.parallel emulates the others with them."""
    return _ON_ASCEND


def set_run_mode(mode: str = "pynative", device: str | None = None) -> None:
    """Select PYNATIVE or GRAPH mode (and optionally the device: "CPU" or "Ascend")."""
    global _ON_ASCEND, _GRAPH
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    kwargs = {"mode": MODES[mode]}
    if device is not None:
        kwargs["device_target"] = device
    ms.set_context(**kwargs)
    _ON_ASCEND = device_target() == "Ascend"
    _GRAPH = mode == "graph"
    if not _ON_ASCEND:
        # On a few shared CPU cores the asynchronous launch queue costs ~5x: a 75-token CFG decode
        # of the demo model took 82 s without this and 17 s with it (pynative).
        ms.runtime.launch_blocking()
    if mode == "graph":
        # Compile the whole cell once (no partial pynative fallback) so shapes stay static.
        ms.set_context(jit_config={"jit_level": "O0"})


def run_mode() -> str:
    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"


def parse_dtype(name) -> ms.Type:
    """Map "fp32"/"fp16"/"bf16" (or a mindspore dtype) to a dtype the current device can run."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
        dtype = DTYPES[name]
    else:
        dtype = name
    if dtype == ms.bfloat16 and not on_ascend():
        raise ValueError(
            "bf16 matmul/conv have no CPU kernel in MindSpore; use dtype fp32 or fp16 on CPU "
            "(bf16 is for Ascend)."
        )
    return dtype


def conv3d_compute_dtype(model_dtype: ms.Type) -> ms.Type:
    """The dtype the vision tokenizer's Conv3d layers compute in, for a model in `model_dtype`.

    Ascend: fp16 whatever the model dtype. MindSpore 2.7's nn.Conv3d (the Conv3D primitive) takes
    only fp16 input on Ascend, and Atlas A2's default precision mode keeps an op's dtype instead of
    casting for it, so fp32 (the default) and bf16 would find no kernel.
    CPU: the model dtype (fp32, or fp16 when asked for).
    """
    return ms.float16 if on_ascend() else model_dtype


def resolve_attn_implementation(name: str) -> str:
    """Validate the requested attention kernel; flash attention exists only on Ascend."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2" and not on_ascend():
        logger.warning(
            "attn_implementation='flash_attention_2' needs an Ascend NPU (device is %s); "
            "falling back to 'eager', which gives the same results.",
            device_target(),
        )
        return "eager"
    return name


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in fp32 and cast back to the input's dtype.

    On Ascend the fused kernel also applies the weight in fp32 (the reference multiplies after the
    cast back); the difference is within one unit of the low-precision dtype.
    """
    if on_ascend():
        out = ops.rms_norm(x.astype(ms.float32), weight.astype(ms.float32), eps)[0]
        return out.astype(x.dtype)
    return _rms_norm_fp32(x, weight, eps)


def _rms_norm_fp32(x, weight, eps):
    dtype = x.dtype
    x32 = x.astype(ms.float32)
    variance = ops.mean(x32 * x32, -1, keep_dims=True)
    x32 = x32 * ops.rsqrt(variance + eps)
    return weight * x32.astype(dtype)


_FIRST_WINDOW = 256


def cache_windows(max_length: int) -> tuple:
    """The attention windows of a static KV cache of max_length slots, ascending; the last is the
    whole cache. A decode step at slot s reads the smallest window above s; each window is one
    compiled graph, so there are few and they grow geometrically.

    CPU: 256, 512, ... while a window is at most a third of the cache. Reading a window copies it
    (a slice) before attention reads it again: 3 reads of the window against 1 of the cache. At
    slot 100 of a 4k cache this took the benchmark's small-model decode step from 86 to 78 ms.
    Ascend: the whole cache only. Flash attention reads a bf16 cache at HBM speed (~14% of an
    8.5B decode step at 9k slots) and each further graph of the 8.5B model is a long compilation.
    """
    if on_ascend():
        return (max_length,)
    windows = []
    window = _FIRST_WINDOW
    while 3 * window <= max_length:
        windows.append(window)
        window *= 2
    return (*windows, max_length)


def attention(query, key, value, mask, implementation: str = "eager", dropout: float = 0.0):
    """Scaled dot-product attention over (B, heads, L, D) query and (B, kv_heads, S, D) key/value.

    `mask` is additive, a 4-D tensor broadcastable to (B, 1, L, S), 0 where attention is allowed and a large
    negative number elsewhere. Grouped-query attention: key/value heads are shared by
    heads // kv_heads query heads. Softmax runs in fp32; the result has the query's dtype.
    """
    if implementation == "flash_attention_2":
        return _flash_attention(query, key, value, mask, dropout)
    return _eager_attention(query, key, value, mask, dropout)


# Scores as one batched matmul against the untransposed keys (MatMul with transpose_b).
_MATMUL_NT = ops.BatchMatMul(transpose_b=True)


def _eager_attention(query, key, value, mask, dropout):
    # Grouped-query attention without repeating k/v: the query heads that share a kv head are
    # stacked along the query axis, so each kv head is read once. On CPU this is ~30x faster than
    # materialising repeated k/v for a decode step over a 4096-slot cache.
    b, heads, length, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    n_rep = heads // kv_heads
    q = query.reshape(b, kv_heads, n_rep * length, d)
    scale = 1.0 / math.sqrt(d)
    scores = _MATMUL_NT(q, key).astype(ms.float32) * scale
    if mask is not None:
        mask = ops.broadcast_to(mask.astype(ms.float32), (mask.shape[0], 1, length, s))
        scores = scores + ops.tile(mask, (1, 1, n_rep, 1))  # row r * length + l is query head r, position l
    probs = apply_dropout(ops.softmax(scores, -1), dropout)
    return ops.matmul(probs.astype(value.dtype), value).reshape(b, heads, length, d)


def _flash_attention(query, key, value, mask, dropout):
    # Ascend's fused kernel takes a boolean "masked out" map and handles GQA natively.
    heads = query.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1])
    dtype = query.dtype
    q, k, v = (t.astype(ms.float16) if dtype == ms.float32 else t for t in (query, key, value))
    masked_out = None if mask is None else (mask < 0).astype(ms.uint8)
    keep_bits = None if dropout == 0.0 else _flash_keep_bits(query.shape, key.shape[2], dropout, q.dtype)
    out = ops.flash_attention_score(
        q, k, v, heads, drop_mask=keep_bits, attn_mask=masked_out, keep_prob=1.0 - dropout, scalar_value=scale,
        input_layout="BNSD",
    )
    return out.astype(dtype)


# ---- dropout ----------------------------------------------------------------------------------
# Recompute (gradient checkpointing) runs a layer's forward again in the backward pass, after
# restoring MindSpore's default generator (ms.get_rng_state / ms.set_rng_state). Only randomness drawn
# from that generator is replayed there; legacy ops.Dropout / nn.Dropout keep their own kernel state
# (and ignore seeds on Ascend), so under recompute their backward would use another mask.

# How far one draw moves the generator's offset: the value MindSpore's own generator-based ops use.
_GENERATOR_STEP = ms.Tensor(12, ms.int64)


def apply_dropout(x, p: float):
    """Training dropout: zero each element with probability p, scale the others by 1 / (1 - p).

    The mask comes from MindSpore's default generator (seeded by ms.manual_seed, saved and restored
    with ms.get_rng_state / ms.set_rng_state), so a recomputed forward draws the same mask:
    - Ascend: mint's generator-based dropout;
    - CPU, pynative: the CPU Dropout kernel seeded with the generator's (seed, offset), and the
      generator moves on by one draw;
    - CPU, graph: no CPU kernel takes seeds as tensors, so the legacy kernel (seeded by ms.set_seed)
      runs; a compiled graph's recompute reuses the forward's mask (measured), but its state is not
      part of ms.get_rng_state.
    """
    if p == 0.0:
        return x
    if _ON_ASCEND:
        return mint.nn.functional.dropout(x, p)
    if _GRAPH:
        return ops.dropout(x, p)
    seed0, seed1 = _draw_kernel_seeds()
    return ops.Dropout(1.0 - p, seed0, seed1)(x)[0]


def _draw_kernel_seeds() -> tuple:
    # On Ascend the generator-based kernels advance the generator's offset in place; the CPU has no
    # such kernel and the generator's own step leaves the offset at 0 in pynative mode (measured), so
    # the draw moves the state itself. The state is the seed and the offset, two int64.
    seed, offset = np.frombuffer(ms.get_rng_state().asnumpy().tobytes(), np.int64)
    ms.set_rng_state(ms.Tensor(np.array([seed, offset + 1], np.int64).view(np.uint8)))
    # The kernel's seeds are 31-bit; both zero would mean "seed from the clock".
    return int(seed) % 2**31, int(offset) % (2**31 - 1) + 1


def _flash_keep_bits(query_shape, key_length: int, p: float, dtype):
    """FlashAttentionScore's drop_mask: uint8 (B, N1, S1, S2 // 8), eight keep bits per byte along the
    keys, drawn from the default generator (the generator-based DropoutGenMaskExt, whose output is
    128-bit aligned, so it is cut to size)."""
    b, heads, length = query_shape[:3]
    if key_length % 8:
        raise ValueError(f"flash attention with dropout needs a key length divisible by 8, got {key_length}")
    seed, offset = default_generator._step(_GENERATOR_STEP)  # pylint: disable=protected-access
    bits = dropout_gen_mask_ext_op((b * heads * length * key_length,), p, seed, offset, dtype)
    return bits[: b * heads * length * key_length // 8].reshape(b, heads, length, key_length // 8)
