"""Classifier-free guidance over a batch of 2B rows: conditional rows first, unconditional after.

The combination is the one of transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor, which
BAAI's Emu3 generation uses: on log-probabilities, s * (cond - uncond) + uncond. Both branches run
in the same forward (batch 2B) with their own rows of the KV cache.
"""

from mindspore import ops


def classifier_free_guidance(logits, guidance_scale: float):
    """(2B, V) logits -> (B, V) guided log-probability scores."""
    # ops.split, not logprobs[:B]: in GRAPH mode on CPU that slice of a (2B, 184622) tensor costs
    # ~25 ms, split ~0.3 ms.
    cond, uncond = ops.split(ops.log_softmax(logits, -1), logits.shape[0] // 2, 0)
    return guidance_scale * (cond - uncond) + uncond
