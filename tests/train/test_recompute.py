"""Recompute (gradient checkpointing) changes memory, never results: with dropout active, the backward
of a recomputed layer must see the forward's masks; and ZeRO-3 must refuse a model whose recompute
already recorded the full parameters."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from emu3 import backend
from tests.mllm.tiny import tiny_model
from train.trainer import LossAndGrads
from train.zero import enable_zero3


def _loss_and_grads(model, ids, seed):
    ms.set_seed(seed)  # graph mode: the legacy CPU kernel's seeds (see backend.apply_dropout)
    ms.manual_seed(seed)
    positions = ms.Tensor(np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape))
    loss, grads = LossAndGrads(model, model.trainable_params())(ids, positions, ids, ms.Tensor(1.0), ms.Tensor(1.0))
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


def _dropout_model():
    model = tiny_model(attention_dropout=0.3)
    model.set_train(True)
    return model


def test_recompute_with_dropout_gives_the_plain_gradients(rng):
    ids = ms.Tensor(rng.integers(3, 512, (2, 16)).astype(np.int32))
    model = _dropout_model()
    loss, grads = _loss_and_grads(model, ids, seed=7)
    model.enable_recompute()
    loss_rc, grads_rc = _loss_and_grads(model, ids, seed=7)

    assert loss_rc == pytest.approx(loss, rel=1e-6)
    for name, a, b in zip((p.name for p in model.trainable_params()), grads, grads_rc):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)
    # dropout was really active: without it the loss differs
    model.set_train(False)
    assert _loss_and_grads(model, ids, seed=7)[0] != pytest.approx(loss, rel=1e-4)


class _DropoutBlock(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(16, 16)

    def construct(self, x):
        return backend.apply_dropout(ops.tanh(self.dense(x)), 0.5)


class _Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.block = _DropoutBlock()
        self.head = nn.Dense(16, 1)

    def construct(self, x):
        return self.head(self.block(x)).sum()


def test_graph_mode_recompute_reuses_the_forward_dropout_mask(rng):
    # GRAPH mode on CPU runs the legacy kernel (no CPU kernel takes generator seeds); the compiled
    # recompute must still give the block's backward the forward's mask.
    backend.set_run_mode("graph", "CPU")
    x = ms.Tensor(rng.standard_normal((8, 16)).astype(np.float32))
    results = []
    for recompute in (False, True):
        ms.set_seed(1)
        net = _Net()
        if recompute:
            net.block.recompute()
        ms.set_seed(3)
        loss, grads = ops.value_and_grad(net, None, net.trainable_params())(x)
        results.append((float(loss.asnumpy()), [g.asnumpy() for g in grads]))
    (loss, grads), (loss_rc, grads_rc) = results
    assert loss_rc == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, grads_rc):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_pynative_dropout_masks_follow_the_default_generator():
    x = ms.Tensor(np.ones((64, 64), np.float32))
    ms.manual_seed(3)
    state = ms.get_rng_state()
    first, second = backend.apply_dropout(x, 0.25).asnumpy(), backend.apply_dropout(x, 0.25).asnumpy()
    ms.set_rng_state(state)
    assert np.array_equal(backend.apply_dropout(x, 0.25).asnumpy(), first)  # restoring the state replays
    assert not np.array_equal(first, second)  # each draw moves the generator on
    ms.manual_seed(4)
    assert not np.array_equal(backend.apply_dropout(x, 0.25).asnumpy(), first)
    # inverted dropout: kept values scaled by 1/(1-p), about p of them dropped
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
    assert abs((first == 0).mean() - 0.25) < 0.03
    assert backend.apply_dropout(x, 0.0) is x


def test_zero3_refuses_a_model_whose_recompute_recorded_the_full_parameters():
    model = tiny_model()
    model.enable_recompute()
    with pytest.raises(ValueError, match="recompute"):
        enable_zero3(model, "unused: refused before any communication")
