"""Classifier-free guidance over a batch of 2B rows: conditional rows first, unconditional after.

The combination is the one of transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor, which
BAAI's Emu3 generation uses: on log-probabilities, s * (cond - uncond) + uncond. Both branches run
in the same forward (batch 2B) with their own rows of the KV cache.
"""

from mindspore import ops


def classifier_free_guidance(logits, guidance_scale: float):
    """(2B, V) logits -> (B, V) guided log-probability scores."""
    batch = logits.shape[0] // 2
    logprobs = ops.log_softmax(logits, -1)
    cond, uncond = logprobs[:batch], logprobs[batch:]
    return guidance_scale * (cond - uncond) + uncond
