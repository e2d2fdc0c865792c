"""Choosing the next token from processed scores, on the device.

Everything here is a pure function of tensors, so it runs op by op in PYNATIVE mode and inside the
compiled decode step in GRAPH mode. Slices of vocabulary-sized tensors use ops.narrow/ops.split:
python slicing compiles to a StridedSlice that costs ~25 ms on (2, 184622) in GRAPH mode on CPU. The filters reproduce transformers' TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper (filtered entries become -inf).

Sampling is inverse-CDF sampling with one uniform number per row and step. The uniforms are drawn
up front from a seeded numpy generator (`draw_uniforms`) and indexed on the device by the step
number, so the same seed gives the same tokens run after run and in both execution modes, and no
random state lives inside the compiled graph.
"""

import numpy as np
import mindspore as ms
from mindspore import ops

NEG_INF = float("-inf")


def apply_temperature(scores, temperature: float):
    return scores / temperature


def top_k_filter(scores, top_k: int):
    """Keep the `top_k` highest scores of each row (ties with the k-th kept too), the rest -inf."""
    top_k = min(top_k, scores.shape[-1])
    kth = ops.narrow(ops.topk(scores, top_k)[0], -1, top_k - 1, 1)
    return ops.masked_fill(scores, scores < kth, NEG_INF)


def top_p_filter(scores, top_p: float):
    """Keep the smallest set of highest scores whose probability mass reaches `top_p`.

    Like transformers: a token is dropped when the probability mass of the tokens ranked at or
    below it is <= 1 - top_p; the best token always stays. The kept tokens are the ones whose
    score reaches a per-row threshold, so no scatter back from sorted order is needed.
    """
    ascending = ops.sort(scores, axis=-1)[0]
    cumulative = ops.cumsum(ops.softmax(ascending, -1), -1)
    n_removed = (cumulative <= 1.0 - top_p).astype(ms.int32).sum(-1, keepdims=True)
    n_removed = ops.clip(n_removed, 0, scores.shape[-1] - 1)
    threshold = ops.gather_elements(ascending, -1, n_removed)
    return ops.masked_fill(scores, scores < threshold, NEG_INF)


def greedy(scores):
    """(B, V) scores -> (B,) int32 ids of the best token."""
    return ops.argmax(scores, -1).astype(ms.int32)


def sample(scores, uniforms, top_k: int | None, top_p: float):
    """Sample one token per row from softmax(scores) after top-k and top-p filtering.

    `uniforms` (B,) in [0, 1). The candidates are the top_k best (all of them when top_k is None),
    sorted best first; top-p then works on that short sorted list, which is what transformers'
    TopPLogitsWarper does after TopKLogitsWarper since filtered tokens carry no probability.
    """
    vocab = scores.shape[-1]
    k = vocab if not top_k else min(top_k, vocab)
    values, indices = ops.topk(scores, k)
    # A row with no candidate at all (every score -inf: where the image constraint forces a
    # non-visual token, whose sample is discarded) must not reach softmax as is: MindSpore 2.7's
    # CPU softmax then silently corrupts the OTHER rows of the batch. Such a row samples uniformly.
    values = ops.where(ops.narrow(values, -1, 0, 1) > NEG_INF, values, 0.0)
    if top_p < 1.0:
        probs = ops.softmax(values, -1)
        # Mass at or below each candidate (ascending cumulative sum read from the best-first list).
        mass_below = probs.sum(-1, keepdims=True) - ops.cumsum(probs, -1) + probs
        drop = mass_below <= 1.0 - top_p
        best = ops.zeros_like(ops.narrow(drop, -1, 0, 1))
        drop = ops.concat((best, ops.narrow(drop, -1, 1, k - 1)), -1)  # the best always stays
        values = ops.masked_fill(values, drop, NEG_INF)
    cdf = ops.cumsum(ops.softmax(values, -1), -1)
    target = uniforms.astype(ms.float32)[:, None] * ops.narrow(cdf, -1, k - 1, 1)
    choice = ops.clip((cdf <= target).astype(ms.int32).sum(-1, keepdims=True), 0, k - 1)
    return ops.gather_elements(indices, -1, choice)[:, 0].astype(ms.int32)


def draw_uniforms(seed: int | None, steps: int, batch_size: int) -> np.ndarray:
    """The (steps, batch_size) float32 uniforms that drive `sample`, from a seeded generator.

    Row t does not depend on `steps`, so a longer draw (a larger cache bucket) gives the same tokens.
    """
    return np.random.default_rng(seed).random((steps, batch_size), dtype=np.float32)
