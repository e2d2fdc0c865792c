"""The lm_head over the visual tokens only, for the steps of an image where a visual token is due.

There only the 32,768 visual columns of the logits can be chosen (emu3.generation.constraints),
so their rows of the lm_head are all the step needs: 5.6x less of the model's largest matrix.

The rows are copied into a Parameter of their own (`load`, once per generation, so it follows
the model's current weights). Slicing them out of the lm_head inside the compiled step copies
them at every step: measured on the CPU (GRAPH mode, hidden 1024, batch 2, shared machine), a
MatMul over the sliced weight took 1.7x-2.5x as long as over the copied rows (medians and minima
of 20 calls in two runs).
"""

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Zero, initializer

from emu3.generation.constraints import VISUAL_CODEBOOK_SIZE, visual_token_ids


class VisualHead(nn.Cell):
    """(B, hidden) last hidden states -> (B, 32768) fp32 logits of the visual tokens, in order."""

    def __init__(self, model):
        super().__init__()
        self.first = int(visual_token_ids(model.config)[0])
        weight = model.lm_head.weight
        # initializer allocates on the host (a bf16 ops.zeros has no CPU kernel)
        self.weight = Parameter(initializer(Zero(), (VISUAL_CODEBOOK_SIZE, weight.shape[1]), weight.dtype),
                                name="visual_head.weight", requires_grad=False)
        self.matmul = ops.MatMul(transpose_b=True)

    def load(self, lm_head_weight) -> None:
        """Copy the visual tokens' rows of `lm_head_weight` (V, hidden)."""
        ops.assign(self.weight, ops.narrow(lm_head_weight, 0, self.first, VISUAL_CODEBOOK_SIZE))

    def construct(self, hidden_states):
        return self.matmul(hidden_states, self.weight).astype(ms.float32)
