"""The one place where CPU and Ascend differ.

Everything else in the package uses ops that have kernels on both devices. What lives here:
run-mode and device selection, the default dtype and attention kernel of each device, dtype
names, the KV-cache write, the few computations that have a fused Ascend kernel but no CPU kernel
(attention, RMSNorm), dropout (generator-based on Ascend; the CPU has no such kernel), which
collectives exist natively, and the vision tokenizer's Conv3d compute dtype (Ascend's Conv3d
takes fp16 only). Each computation has a plain fallback that is the reference implementation on
CPU and the numerical yardstick for the fused one.
"""

import contextlib
import logging
import math

import mindspore as ms
import numpy as np
from mindspore import mint, ops
from mindspore.common.generator import default_generator
from mindspore.ops.auto_generate import InplaceIndexCopy
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
        ms.set_context(jit_config={"jit_level": jit_level()})


def jit_level() -> str:
    """The graph compilation level of the current device (docs/llm.md has the reasoning).

    CPU: O0, kernel by kernel; O1 fuses nothing on the CPU (the same 376 kernels per decode step
    of the benchmark's small model). Ascend: O1, the same kernel-by-kernel runtime plus MindSpore's
    automatic operator fusion: a decode step is a few hundred small kernels, mostly elementwise
    (RMSNorm, RoPE, residual adds), whose launch cost dominates it. O2 (whole-graph sinking through
    CANN's GraphEngine) would also remove the launches, but it compiles another operator set than
    the one tests/ascend checks, at a much longer compilation.
    """
    return "O1" if _ON_ASCEND else "O0"


def run_mode() -> str:
    return "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "pynative"


@contextlib.contextmanager
def running_in(mode: str | None):
    """Run the block in `mode` ("pynative" or "graph"), then return to the mode before it; None
    leaves the mode as it is."""
    if mode is None:
        yield
        return
    previous = run_mode()
    set_run_mode(mode)
    try:
        yield
    finally:
        set_run_mode(previous)


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


def default_dtype() -> str:
    """bf16 on Ascend (the checkpoints' dtype, half of fp32's memory); fp32 on CPU, which has no
    bf16 matmul."""
    return "bf16" if on_ascend() else "fp32"


def default_attn_implementation() -> str:
    """Ascend's fused kernels where there is an NPU, the eager reference elsewhere."""
    return "flash_attention_2" if on_ascend() else "eager"


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


# Slots a query may not attend get this score before the softmax: transformers' value (finfo(float32).min).
_MASKED = float(np.finfo(np.float32).min)


def attention(query, key, value, masked, implementation: str = "eager", dropout: float = 0.0):
    """Scaled dot-product attention over (B, heads, L, D) query and (B, kv_heads, S, D) key/value.

    `masked` is a boolean map, True where a query may not attend a key, of shape (B, 1, L, S) or
    (L, S) (None: no mask). It is the format every kernel takes, so a model builds it once per
    forward and each layer passes it on unchanged. Every query row must allow at least one key:
    fully masked rows are undefined on the fused kernels (emu3.mllm.model always allows a token's
    own slot). Grouped-query attention: key/value heads are shared by heads // kv_heads query heads.
    Softmax runs in fp32; the result has the query's dtype.
    """
    if implementation == "flash_attention_2":
        if query.shape[2] == 1 and dropout == 0.0:
            return _incremental_attention(query, key, value, masked)
        return _flash_attention(query, key, value, masked, dropout)
    return _eager_attention(query, key, value, masked, dropout)


# Scores as one batched matmul against the untransposed keys (MatMul with transpose_b).
_MATMUL_NT = ops.BatchMatMul(transpose_b=True)


def _eager_attention(query, key, value, masked, dropout):
    # Grouped-query attention without repeating k/v: the query heads that share a kv head are
    # stacked along the query axis, so each kv head is read once. On CPU this is ~30x faster than
    # materialising repeated k/v for a decode step over a 4096-slot cache.
    b, heads, length, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    q = query.reshape(b, kv_heads, heads // kv_heads * length, d)
    scores = _MATMUL_NT(q, key).astype(ms.float32) * (1.0 / math.sqrt(d))
    if masked is not None:
        # Stacked (B, kv_heads, n_rep * L, S) is the memory of (B, heads, L, S), where the map
        # broadcasts over the heads; for one query (a decode step) the stacked rows are the heads.
        if length > 1:
            scores = scores.reshape(b, heads, length, s)
        scores = ops.masked_fill(scores, masked, _MASKED)
    probs = apply_dropout(ops.softmax(scores, -1), dropout)
    probs = probs.astype(value.dtype).reshape(b, kv_heads, -1, s)
    return ops.matmul(probs, value).reshape(b, heads, length, d)


def _half(tensors, dtype):
    # Ascend's fused attention kernels take fp16/bf16 only.
    return tuple(t.astype(ms.float16) for t in tensors) if dtype == ms.float32 else tensors


def _flash_attention(query, key, value, masked, dropout):
    # Prefill and training: FlashAttentionScore takes the boolean map as is and handles GQA natively.
    q, k, v = _half((query, key, value), query.dtype)
    keep_bits = None if dropout == 0.0 else _flash_keep_bits(query.shape, key.shape[2], dropout, q.dtype)
    out = ops.flash_attention_score(
        q, k, v, query.shape[1], drop_mask=keep_bits, attn_mask=masked, keep_prob=1.0 - dropout,
        scalar_value=1.0 / math.sqrt(query.shape[-1]), input_layout="BNSD",
    )
    return out.astype(query.dtype)


def _incremental_attention(query, key, value, masked):
    # One-token decode steps: FusedInferAttentionScore's incremental branch (Q_S = 1), which
    # reads the KV cache once per kv head; the (B, 1, 1, S) map is one of its documented shapes.
    q, k, v = _half((query, key, value), query.dtype)
    out = ops.fused_infer_attention_score(
        q, k, v, atten_mask=masked, num_heads=query.shape[1], num_key_value_heads=key.shape[1],
        scale=1.0 / math.sqrt(query.shape[-1]), input_layout="BNSD",
    )[0]
    return out.astype(query.dtype)


_INDEX_ADD = ops.IndexAdd(axis=2)
_INDEX_COPY = InplaceIndexCopy()


def write_cache_slots(cache, slots, values):
    """Write (B, heads, L, D) `values` into the (B, heads, S, D) Parameter `cache` at the L `slots`
    (axis 2), in place; returns the written cache.

    CPU: IndexAdd into zeroed slots (KVCache.reset; 0 + x is exactly x), the fastest in-place write
    measured there (emu3/generation/cache.py). Ascend: InplaceIndexCopy, whose aclnn kernel lists
    bf16 on Atlas A2; IndexAdd lists none for bf16.
    """
    if on_ascend():
        return _INDEX_COPY(cache, 2, slots, values)
    return _INDEX_ADD(cache, slots, values)


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
