"""One optimisation step: loss, gradients, reduction across ranks, loss scaling, clipping, AdamW.

The pieces that touch tensors are Cells, so they run op by op in pynative mode and compiled in
graph mode. `TrainStep` runs a whole step (after the micro-batches that `AccumulateGrads` adds up)
as ONE graph: from the backward to the weight update nothing goes through the host, and skipping
an overflowing update is a branch inside the graph. What stays in Python is what changes between
steps as numbers (the learning rate, the loss scale), and it is saved in checkpoints.
"""

import math
from dataclasses import dataclass

import mindspore as ms
from mindspore import nn, ops

from train.parallel import ParallelState

IGNORE_INDEX = -100


def cosine_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to base_lr, then cosine decay to min_lr at total_steps (step counts from 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class TokenLoss(nn.Cell):
    """Sum of next-token cross-entropies over supervised positions, divided by `denominator`.

    Labels are already shifted (position t holds the token t+1), so a sequence split over ranks
    needs nothing from its neighbours; the denominator is the replica-wide count of supervised
    tokens times the number of data-parallel replicas and accumulation steps, which makes the sum
    of every rank's loss the global mean.

    The gradient is written out, (softmax - one-hot) * dloss / denominator on supervised rows: on
    the (tokens, 184622) logits of the tiny SFT benchmark ops.cross_entropy's forward and backward
    took ~4.7x as long (a log-softmax built from ReduceMax, whose gradient is differentiated too,
    and a label-smoothing sum computed at 0), and LogSoftmax's own gradient kernel ~1.8x.
    """

    def construct(self, logits, shifted_labels, denominator):
        supervised, labels, flat = self._flat(logits, shifted_labels)
        picked = ops.gather_elements(ops.log_softmax(flat, -1), 1, labels)
        return -ops.where(supervised, picked, 0.0).sum() / denominator

    def bprop(self, logits, shifted_labels, denominator, out, dout):
        supervised, labels, flat = self._flat(logits, shifted_labels)
        coef = ops.where(supervised, dout / denominator, 0.0)
        grad = ops.softmax(flat, -1) * coef
        grad = ops.tensor_scatter_elements(grad, labels, ops.gather_elements(grad, 1, labels) - coef, 1)
        return (grad.reshape(logits.shape).astype(logits.dtype), ops.zeros_like(shifted_labels),
                ops.zeros_like(denominator))

    @staticmethod
    def _flat(logits, shifted_labels):
        """(supervised (N, 1), labels with 0 for ignored rows (N, 1), fp32 logits (N, V))."""
        flat_labels = shifted_labels.reshape(-1, 1)
        supervised = flat_labels != IGNORE_INDEX
        flat_logits = logits.reshape(-1, logits.shape[-1]).astype(ms.float32)
        return supervised, ops.where(supervised, flat_labels, 0), flat_logits


token_loss = TokenLoss()


class LossAndGrads(nn.Cell):
    """(local loss, gradients of loss * loss_scale) for one micro-batch on this rank."""

    def __init__(self, model, params):
        super().__init__(auto_prefix=False)
        self.model = model
        self.params = params
        self.grad_fn = ops.value_and_grad(self._scaled_loss, None, params)

    def _scaled_loss(self, input_ids, position_ids, shifted_labels, denominator, loss_scale):
        logits = self.model(input_ids, position_ids=position_ids)
        return token_loss(logits, shifted_labels, denominator) * loss_scale

    def construct(self, input_ids, position_ids, shifted_labels, denominator, loss_scale):
        scaled, grads = self.grad_fn(input_ids, position_ids, shifted_labels, denominator, loss_scale)
        return scaled / loss_scale, grads


class GradientCheck(nn.Cell):
    """Sum replicated gradients across ranks, unscale, and measure: (grads, global norm, overflow).

    With ZeRO-3 every gradient is already this rank's summed shard, so only the squared norms and
    the overflow flag are summed across ranks; without it, whole gradients are all-reduced.
    """

    def __init__(self, state: ParallelState, sharded: bool, scaled: bool, low_precision: bool):
        super().__init__()
        self.multi = state.world_size > 1
        self.sharded = sharded
        self.scaled = scaled
        self.low_precision = low_precision
        if self.multi:
            self.allreduce = ops.AllReduce(ops.ReduceOp.SUM, group=state.world_group)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, loss_scale):
        if self.multi and not self.sharded:
            grads = self.hyper_map(self.allreduce, grads)
        if self.low_precision:  # fp16/bf16 gradients of fp16/bf16 weights; the update is in fp32
            grads = tuple([g.astype(ms.float32) for g in grads])
        if self.scaled:
            inv = 1.0 / loss_scale
            grads = tuple([g * inv for g in grads])
        squares = ops.stack([ops.sum(g * g) for g in grads]).sum()
        stats = ops.stack([squares, ops.logical_not(ops.isfinite(squares)).astype(ms.float32)])
        if self.multi and self.sharded:
            stats = self.allreduce(stats)
        return grads, ops.sqrt(stats[0]), stats[1] > 0


class AdamW(nn.Cell):
    """Adam with decoupled weight decay and bias correction: torch.optim.AdamW's update.

    Runs as one fused AdamWeightDecay kernel per parameter (it has CPU and Ascend kernels but no
    bias correction, which is folded into its learning rate, epsilon and decay arguments).
    `weight_decay` is applied to every parameter whose full tensor has 2+ dimensions (matrices and
    embeddings), not to RMSNorm weights or biases, as is usual for transformer fine-tuning.
    """

    def __init__(self, params, full_shapes: dict, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.m = self.params.clone("optimizer.m", init="zeros")
        self.v = self.params.clone("optimizer.v", init="zeros")
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.decay = tuple(weight_decay if len(full_shapes[p.name]) >= 2 else 0.0 for p in params)
        self.step = ms.Parameter(ms.Tensor(0, ms.int32), name="optimizer.step", requires_grad=False)
        self.adam = ops.AdamWeightDecay()

    def construct(self, grads, lr):
        step = self.step + 1
        ops.assign(self.step, step)
        stepf = step.astype(ms.float32)
        bias1 = 1.0 - ops.pow(self.beta1, stepf)
        root_bias2 = ops.sqrt(1.0 - ops.pow(self.beta2, stepf))
        # p -= lr*wd*p + lr/b1 * m / (sqrt(v/b2) + eps)  ==  p -= k*(m / (sqrt(v) + eps*sqrt(b2)) + wd*b1/sqrt(b2)*p)
        k = lr * root_bias2 / bias1
        eps = self.eps * root_bias2
        beta1 = ms.Tensor(self.beta1, ms.float32)
        beta2 = ms.Tensor(self.beta2, ms.float32)
        for i in range(len(self.params)):
            decay = self.decay[i] * bias1 / root_bias2
            self.adam(self.params[i], self.m[i], self.v[i], k, beta1, beta2, eps, decay, grads[i])
        return step


@dataclass
class LossScaler:
    """Dynamic loss scaling for fp16: halve on overflow (the step is skipped), double after
    `window` clean steps. With fp32/bf16 the scale stays 1 and never changes."""

    scale: float = 1.0
    window: int = 1000
    good_steps: int = 0
    dynamic: bool = False

    def update(self, overflow: bool) -> None:
        if not self.dynamic:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.window:
                self.scale *= 2.0
                self.good_steps = 0


class AccumulateGrads(nn.Cell):
    """A micro-batch of gradient accumulation: its gradients are added to fp32 buffers (one per
    parameter, in place); `TrainStep` adds them to the last micro-batch's and zeroes them."""

    def __init__(self, loss_and_grads: LossAndGrads):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.buffers = ms.ParameterTuple(
            ms.Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_buffer.{p.name}", requires_grad=False)
            for p in loss_and_grads.params)

    def construct(self, input_ids, position_ids, shifted_labels, denominator, loss_scale):
        loss, grads = self.loss_and_grads(input_ids, position_ids, shifted_labels, denominator, loss_scale)
        added = [ops.assign_add(b, g.astype(ms.float32)) for b, g in zip(self.buffers, grads)]
        return ops.depend(loss, tuple(added))

    def take(self, grads):
        """grads + the buffers, and the buffers back to zero (inside the caller's graph)."""
        total = tuple([g.astype(ms.float32) + b for g, b in zip(grads, self.buffers)])
        return ops.depend(total, tuple([ops.assign(b, ops.zeros_like(b)) for b in self.buffers]))


class TrainStep(nn.Cell):
    """One optimisation step in one graph: the last micro-batch's loss and gradients (plus those
    of `accumulated`), GradientCheck (reduction across ranks, unscaling, global norm, overflow),
    clipping to `max_grad_norm` (torch's clip_grad_norm_ rule; 0: none), AdamW and the copy of the
    updated master weights into the model's fp16/bf16 weights. An overflowing update is skipped.

    Returns (loss of the micro-batch, global gradient norm before clipping, overflow).
    """

    def __init__(self, loss_and_grads: LossAndGrads, check: GradientCheck, optimizer: AdamW, max_grad_norm: float,
                 accumulated: AccumulateGrads | None = None):
        super().__init__(auto_prefix=False)
        self.loss_and_grads = loss_and_grads
        self.check = check
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.accumulated = accumulated
        weights = ms.ParameterTuple(loss_and_grads.params)
        # fp16/bf16 weights are updated through fp32 master copies (the optimizer's parameters).
        self.copies = None if optimizer.params[0] is weights[0] else weights

    def construct(self, input_ids, position_ids, shifted_labels, denominator, loss_scale, lr):
        loss, grads = self.loss_and_grads(input_ids, position_ids, shifted_labels, denominator, loss_scale)
        if self.accumulated is not None:
            grads = self.accumulated.take(grads)
        grads, norm, overflow = self.check(grads, loss_scale)
        if self.max_grad_norm > 0:
            clip = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
            grads = tuple([g * clip for g in grads])
        if not overflow:
            step = self.optimizer(grads, lr)
            if self.copies is not None:
                copied = [ops.assign(w, m.astype(w.dtype)) for w, m in zip(self.copies, self.optimizer.params)]
                step = ops.depend(step, tuple(copied))
            loss = ops.depend(loss, step)
        return loss, norm, overflow
