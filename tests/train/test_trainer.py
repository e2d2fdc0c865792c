"""The optimiser pieces against their definitions (torch.optim.AdamW, the cosine schedule), the
fused step against PyTorch (loss, gradients, clipping, AdamW), gradient accumulation, fp16 loss
scaling, and graph mode against pynative."""

import json
import logging
import math

import mindspore as ms
import numpy as np
import pytest

from tests.mllm.tiny import tiny_model, torch_twin
from train.parallel import ParallelState
from train.sft import Run, parse_args
from train.trainer import (IGNORE_INDEX, AccumulateGrads, AdamW, GradientCheck, LossAndGrads, LossScaler, TrainStep,
                           cosine_lr)

from .conftest import grid, make_data, make_model_dir


def test_adamw_matches_torch_with_weight_decay_on_matrices_only(rng, torch_reference):
    torch = torch_reference
    shapes = {"w": (3, 4), "norm": (4,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]

    params = [ms.Parameter(ms.Tensor(init[k]), name=k) for k in shapes]
    opt = AdamW(params, shapes, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g, lr in zip(grads, lrs):
        opt(tuple(ms.Tensor(g[k]) for k in shapes), ms.Tensor(lr, ms.float32))

    tp = {k: torch.nn.Parameter(torch.tensor(init[k])) for k in shapes}
    topt = torch.optim.AdamW([{"params": [tp["w"]], "weight_decay": 0.1},
                              {"params": [tp["norm"]], "weight_decay": 0.0}], betas=(0.9, 0.95), eps=1e-8)
    for g, lr in zip(grads, lrs):
        for group in topt.param_groups:
            group["lr"] = lr
        for k in shapes:
            tp[k].grad = torch.tensor(g[k])
        topt.step()
    for p in params:
        np.testing.assert_allclose(p.asnumpy(), tp[p.name].detach().numpy(), rtol=1e-5, atol=1e-6)
    # weight decay really acts: with zero gradients a matrix shrinks, a norm weight does not
    w0, n0 = params[0].asnumpy().copy(), params[1].asnumpy().copy()  # asnumpy() shares memory
    opt2 = AdamW(params, shapes, weight_decay=0.5)
    opt2(tuple(ms.Tensor(np.zeros(s, np.float32)) for s in shapes.values()), ms.Tensor(0.1, ms.float32))
    np.testing.assert_allclose(params[0].asnumpy(), w0 * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(params[1].asnumpy(), n0, rtol=1e-6)


def test_cosine_schedule_with_warmup_and_floor():
    lrs = [cosine_lr(s, 1.0, 0.1, 4, 14) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0
    assert math.isclose(lrs[9], 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lrs[14], 0.1) and math.isclose(lrs[15], 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_dynamic_loss_scale_halves_on_overflow_and_grows_after_window():
    s = LossScaler(scale=1024.0, window=3, dynamic=True)
    s.update(True)
    assert s.scale == 512.0
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024.0 and s.good_steps == 0
    fixed = LossScaler(scale=1.0)
    fixed.update(True)
    assert fixed.scale == 1.0


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model_dir = make_model_dir(root / "model")
    data = make_data(root / "data", [{"name": "a", "images": grid(0, 2, 3), "texts": "a red square"},
                                     {"name": "b", "images": grid(1, 2, 3), "texts": "a blue circle"}])
    return root, ["--model_path", str(model_dir), "--data_path", str(data), "--max_length", "24",
                  "--batch_size", "2", "--null_prompt_prob", "0", "--save_steps", "100", "--lr", "1e-3"]


def test_fp16_dynamic_loss_scaling_skips_overflow_steps(tiny_run_args, caplog):
    root, common = tiny_run_args
    reference = Run(parse_args(common + ["--output_dir", str(root / "fp32")])).train_step()

    overflowing = Run(parse_args(common + ["--output_dir", str(root / "ovf"), "--dtype", "fp16",
                                           "--loss_scale", str(2.0**40), "--max_steps", "1"]))
    before = [p.asnumpy().copy() for p in overflowing.params]
    with caplog.at_level(logging.WARNING):
        overflowing.train()
    record = json.loads((root / "ovf" / "log.jsonl").read_text().splitlines()[0])
    assert record["overflow"] and "overflow, update skipped" in caplog.text
    assert all(np.array_equal(b, p.asnumpy()) for b, p in zip(before, overflowing.params))
    assert overflowing.scaler.scale == 2.0**39
    assert overflowing.params[0].dtype == ms.float16 and overflowing.master[0].dtype == ms.float32

    clean = Run(parse_args(common + ["--output_dir", str(root / "fp16"), "--dtype", "fp16", "--loss_scale", "1024"]))
    record = clean.train_step()
    assert not record["overflow"]
    assert record["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=2e-3)


def test_graph_mode_with_recompute_matches_pynative(tiny_run_args):
    root, common = tiny_run_args
    losses = {}
    for mode in ("pynative", "graph"):
        run = Run(parse_args(common + ["--output_dir", str(root / mode), "--mode", mode, "--recompute", "true"]))
        losses[mode] = [run.train_step()["loss"] for _ in range(2)]
    np.testing.assert_allclose(losses["graph"], losses["pynative"], rtol=1e-6)
    assert losses["pynative"][1] < losses["pynative"][0]


def _batch(rng, rows, length, vocab):
    ids = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    labels = rng.integers(3, vocab, (rows, length)).astype(np.int32)
    labels[:, : length // 3] = IGNORE_INDEX  # the prompt part
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    return ids, positions, labels


def _our_step(model, max_grad_norm=0.5, accumulate=False):
    params = model.trainable_params()
    loss_and_grads = LossAndGrads(model, params)
    accumulated = AccumulateGrads(loss_and_grads) if accumulate else None
    optimizer = AdamW(params, {p.name: tuple(p.shape) for p in params}, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1)
    step = TrainStep(loss_and_grads, GradientCheck(ParallelState(), False, False, False), optimizer, max_grad_norm,
                     accumulated)
    return loss_and_grads, step, accumulated


def test_train_step_matches_torch_and_compiles_once(run_mode, rng, torch_reference, compilations):
    """TokenLoss's written-out gradient, the global norm, clip_grad_norm_ and AdamW in one graph:
    two steps against transformers' Emu3 + F.cross_entropy + torch.optim.AdamW. In GRAPH mode the
    step compiles once (the gradients never leave the graph)."""
    torch = torch_reference
    model = tiny_model(seed=1)
    ref = torch_twin(model, torch)
    loss_and_grads, step, _ = _our_step(model)
    batches = [_batch(rng, 2, 12, 512) for _ in range(2)]
    denominators = [float((b[2] != IGNORE_INDEX).sum()) for b in batches]

    one = ms.Tensor(1.0, ms.float32)
    ids, pos, labels = batches[0]
    _, grads = loss_and_grads(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(labels), ms.Tensor(denominators[0]), one)

    groups = [{"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    torch_params = dict(ref.named_parameters())
    for index, ((ids, pos, labels), denominator) in enumerate(zip(batches, denominators)):
        logits = ref(input_ids=torch.from_numpy(ids).long(), position_ids=torch.from_numpy(pos).long()).logits
        expected_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), torch.from_numpy(labels).long()
                                                          .reshape(-1), ignore_index=IGNORE_INDEX,
                                                          reduction="sum") / denominator
        topt.zero_grad()
        expected_loss.backward()
        if index == 0:  # the written-out gradient of the loss, before any update
            for (name, _), grad in zip(model.parameters_and_names(), grads):
                np.testing.assert_allclose(grad.asnumpy(), torch_params[name].grad.numpy(), rtol=1e-4, atol=1e-7,
                                           err_msg=name)
        expected_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        topt.step()
        loss, norm, overflow = step(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(labels), ms.Tensor(denominator), one,
                                    ms.Tensor(1e-2, ms.float32))
        assert float(loss.asnumpy()) == pytest.approx(expected_loss.item(), rel=1e-5)
        assert float(norm.asnumpy()) == pytest.approx(expected_norm.item(), rel=1e-5)
        assert not bool(overflow.asnumpy()) and expected_norm.item() > 0.5  # clipping was active
        if index == 0:
            # The first update moves a weight by ~lr * sign(grad): where a gradient is ~eps (1e-8),
            # its float rounding shows (a few elements); everything else agrees to 1e-6. The second
            # step's loss and norm check the updated model as a whole.
            for name, p in model.parameters_and_names():
                ours, theirs = p.asnumpy(), torch_params[name].detach().numpy()
                np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4, err_msg=name)
                assert np.mean(np.abs(ours - theirs) > 1e-6) < 1e-3, name
    if run_mode == "graph":
        assert sum(compilations) == 2, compilations  # LossAndGrads above, then TrainStep once for both steps


def test_accumulated_micro_batches_equal_one_batch(rng):
    """AccumulateGrads on the first half of a batch, TrainStep on the second == TrainStep on the whole
    batch (same global denominator); the buffers are back at zero."""
    ids, pos, labels = _batch(rng, 2, 12, 512)
    denominator = ms.Tensor(float((labels != IGNORE_INDEX).sum()), ms.float32)
    one, lr = ms.Tensor(1.0, ms.float32), ms.Tensor(1e-2, ms.float32)
    whole = tiny_model(seed=2)
    _, step, _ = _our_step(whole)
    _, whole_norm, _ = step(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(labels), denominator, one, lr)

    split = tiny_model(seed=2)
    _, step, accumulated = _our_step(split, accumulate=True)
    first = accumulated(ms.Tensor(ids[:1]), ms.Tensor(pos[:1]), ms.Tensor(labels[:1]), denominator, one)
    second, norm, _ = step(ms.Tensor(ids[1:]), ms.Tensor(pos[1:]), ms.Tensor(labels[1:]), denominator, one, lr)
    assert float(norm.asnumpy()) == pytest.approx(float(whole_norm.asnumpy()), rel=1e-5)
    assert float(first.asnumpy()) + float(second.asnumpy()) > 0
    # As after the first step above: summing the gradient in two parts rounds differently, which
    # shows only where a gradient is ~eps (AdamW's first update is ~lr * sign(grad) elsewhere).
    for (name, a), b in zip(whole.parameters_and_names(), split.get_parameters()):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=0, atol=1e-4, err_msg=name)
        assert np.mean(np.abs(b.asnumpy() - a.asnumpy()) > 1e-6) < 1e-3, name
    assert all(not b.asnumpy().any() for b in accumulated.buffers)


def test_train_step_skips_a_non_finite_update(run_mode, rng):
    """The overflow branch inside the graph: infinite gradients (a zero denominator) leave the
    weights, the optimizer state and its step count untouched."""
    model = tiny_model(seed=3)
    _, step, _ = _our_step(model)
    before = [p.asnumpy().copy() for p in model.get_parameters()]
    ids, pos, labels = _batch(rng, 1, 8, 512)
    _, norm, overflow = step(ms.Tensor(ids), ms.Tensor(pos), ms.Tensor(labels), ms.Tensor(0.0, ms.float32),
                             ms.Tensor(1.0, ms.float32), ms.Tensor(1e-2, ms.float32))
    assert bool(overflow.asnumpy()) and not np.isfinite(float(norm.asnumpy()))
    assert all(np.array_equal(b, p.asnumpy()) for b, p in zip(before, model.get_parameters()))
    assert int(step.optimizer.step.asnumpy()) == 0 and not any(m.asnumpy().any() for m in step.optimizer.m)
