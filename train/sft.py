"""Supervised fine-tuning of Emu3 for text-to-image (T2I) or VQA.

    python -m train.sft --config configs/t2i_sft_8npu.yaml [--option value ...]

launched once per device by msrun (see scripts/t2i_sft_seq_parallel.sh). Every option can be
given in the YAML config and overridden on the command line. Rank 0 writes OUTPUT_DIR/log.jsonl
(one JSON line per step: loss, lr, grad_norm, loss_scale, overflow, s/step) and checkpoints to
OUTPUT_DIR/checkpoints/ (see train/checkpoint.py); `--resume` continues from the latest one.
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import yaml
from mindspore import ops

from emu3 import backend
from train import checkpoint
from train.dataset import DataLoader, SFTDataset, shift_labels
from train.parallel import enable_sequence_parallel, init_parallel
from train.trainer import AccumulateGrads, AdamW, GradientCheck, LossAndGrads, LossScaler, TrainStep, cosine_lr
from train.zero import enable_zero3

logger = logging.getLogger("train.sft")

# name: (type, default, help)
OPTIONS = {
    "task": (str, "t2i", "t2i (loss on vision tokens) or vqa (loss on the response)"),
    "model_path": (str, None, "Emu3 checkpoint directory to fine-tune (e.g. Emu3-Stage1)"),
    "tokenizer_path": (str, None, "directory with emu3.tiktoken + emu3_vision_tokens.txt (default: model_path)"),
    "data_path": (str, None, "prepared data directory (holds list/train.json)"),
    "output_dir": (str, "outputs/sft", "where log.jsonl and checkpoints/ go"),
    "device": (str, None, "CPU or Ascend (default: MindSpore's default device)"),
    "mode": (str, "pynative", "pynative or graph"),
    "dtype": (str, "fp32", "weights/compute dtype: fp32, fp16 (dynamic loss scaling) or bf16 (Ascend); "
                           "AdamW always updates fp32 master weights"),
    "attn_implementation": (str, "eager", "eager or flash_attention_2 (Ascend)"),
    "max_length": (int, 4200, "tokens per sequence (padded/truncated to this)"),
    "batch_size": (int, 1, "sequences per micro-batch per data-parallel replica"),
    "grad_accum": (int, 1, "micro-batches per optimizer step"),
    "max_steps": (int, 400, "optimizer steps"),
    "lr": (float, 1e-5, "peak learning rate"),
    "min_lr": (float, 0.0, "learning rate at the end of the cosine decay"),
    "warmup_steps": (int, 0, "linear warmup steps"),
    "weight_decay": (float, 0.1, "AdamW decoupled weight decay (matrices and embeddings only)"),
    "adam_beta1": (float, 0.9, ""),
    "adam_beta2": (float, 0.95, ""),
    "adam_eps": (float, 1e-8, ""),
    "max_grad_norm": (float, 1.0, "clip the global gradient norm to this (0: no clipping)"),
    "loss_scale": (float, 65536.0, "initial loss scale (fp16 only)"),
    "loss_scale_window": (int, 1000, "clean steps before the fp16 loss scale doubles"),
    "recompute": (bool, False, "gradient checkpointing per decoder layer"),
    "sp_size": (int, 1, "sequence-parallel group size (ranks sharing one sequence)"),
    "zero_stage": (int, 0, "0 (replicated) or 3 (parameters, gradients, optimizer state sharded)"),
    "null_prompt_prob": (float, 0.05, "T2I: probability of an empty caption (trains the CFG branch)"),
    "save_steps": (int, 100, "checkpoint every N steps (and at the end)"),
    "save_total_limit": (int, 2, "keep the last K checkpoints"),
    "log_steps": (int, 1, "print a log line every N steps"),
    "seed": (int, 42, ""),
    "resume": (bool, False, "continue from the latest checkpoint in output_dir"),
}


def _bool(text):
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = {}
    if known.config:
        defaults = yaml.safe_load(Path(known.config).read_text()) or {}
        unknown = set(defaults) - set(OPTIONS)
        if unknown:
            raise SystemExit(f"{known.config}: unknown options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the options below")
    for name, (kind, default, doc) in OPTIONS.items():
        parser.add_argument(f"--{name}", type=_bool if kind is bool else kind,
                            default=defaults.get(name, default), help=doc)
    args = parser.parse_args(argv)
    for required in ("model_path", "data_path"):
        if getattr(args, required) is None:
            parser.error(f"--{required} is required (on the command line or in the config)")
    if args.zero_stage not in (0, 3):
        parser.error("--zero_stage must be 0 or 3")
    return args


def _load_model(args):
    from emu3.mllm.model import Emu3ForCausalLM

    model = Emu3ForCausalLM.from_pretrained(args.model_path, dtype=args.dtype,
                                            attn_implementation=args.attn_implementation)
    if args.recompute:
        model.enable_recompute()
    model.set_train(True)
    return model


def _load_tokenizer(args):
    from emu3.mllm.tokenizer import Emu3Tokenizer

    return Emu3Tokenizer.from_pretrained(args.tokenizer_path or args.model_path, padding_side="right")


class Run:
    """Everything one rank needs to train: model, optimizer, data and their saved state."""

    def __init__(self, args):
        self.args = args
        backend.set_run_mode(args.mode, args.device)
        ms.set_seed(args.seed)
        self.ps = init_parallel(args.sp_size)
        if args.max_length % args.sp_size:
            raise ValueError(f"max_length={args.max_length} must be a multiple of sp_size={args.sp_size}")
        self.model = _load_model(args)
        self.model_config = self.model.config.to_dict()
        if self.ps.sp_size > 1:
            enable_sequence_parallel(self.model, self.ps)
        if args.zero_stage == 3 and self.ps.world_size > 1:
            self.full_shapes = enable_zero3(self.model, self.ps.world_group)
        else:
            self.full_shapes = {p.name: tuple(p.shape) for p in self.model.trainable_params()}
        self.sharded = args.zero_stage == 3 and self.ps.world_size > 1
        self.params = self.model.trainable_params()
        # fp16/bf16 weights compute forward and backward; AdamW updates fp32 master copies of them.
        low = args.dtype != "fp32"
        self.master = [ms.Parameter(p.astype(ms.float32), name=p.name) for p in self.params] if low else self.params
        self.optimizer = AdamW(self.master, self.full_shapes, (args.adam_beta1, args.adam_beta2),
                               args.adam_eps, args.weight_decay)
        loss_and_grads = LossAndGrads(self.model, self.params)
        self.accumulate = AccumulateGrads(loss_and_grads) if args.grad_accum > 1 else None
        self.update = TrainStep(loss_and_grads, GradientCheck(self.ps, self.sharded, scaled=args.dtype == "fp16",
                                                              low_precision=low),
                                self.optimizer, args.max_grad_norm, self.accumulate)
        self.scaler = LossScaler(args.loss_scale if args.dtype == "fp16" else 1.0,
                                 args.loss_scale_window, dynamic=args.dtype == "fp16")
        self.dataset = SFTDataset(args.data_path, _load_tokenizer(args), args.task, args.max_length,
                                  args.null_prompt_prob, args.seed)
        self.loader = DataLoader(self.dataset, args.batch_size, self.ps.dp_rank, self.ps.dp_size, args.seed)
        self.barrier = checkpoint.Barrier(self.ps.world_group)
        self.allreduce = ops.AllReduce(ops.ReduceOp.SUM, group=self.ps.world_group) if self.ps.world_size > 1 else None
        self.step = 0
        if args.resume:
            self.resume()

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "loss_scale": self.scaler.scale, "loss_scale_good_steps": self.scaler.good_steps,
                "world_size": self.ps.world_size, "sp_size": self.ps.sp_size, "zero_stage": 3 if self.sharded else 0,
                "full_shapes": {k: list(v) for k, v in self.full_shapes.items()},
                "model_config": self.model_config, "args": vars(self.args)}

    def save(self) -> None:
        tensors = checkpoint.parameter_arrays(self.master)
        tensors.update(checkpoint.parameter_arrays(self.optimizer.m))
        tensors.update(checkpoint.parameter_arrays(self.optimizer.v))
        tensors["optimizer.step"] = self.optimizer.step.asnumpy().reshape(1)
        tensors["data.position"] = np.asarray(self.loader.position, np.int64)
        path = checkpoint.save(self.args.output_dir, self.step, self.ps.rank, self.barrier, tensors,
                               self.state(), self.args.save_total_limit)
        if self.ps.rank == 0:
            logger.info("saved %s", path)

    def resume(self) -> None:
        directory = checkpoint.latest_checkpoint(self.args.output_dir)
        if directory is None:
            logger.warning("--resume: no checkpoint in %s/checkpoints, starting from scratch", self.args.output_dir)
            return
        state = checkpoint.load_state(directory)
        for key, mine in (("world_size", self.ps.world_size), ("sp_size", self.ps.sp_size),
                          ("zero_stage", 3 if self.sharded else 0)):
            if state[key] != mine:
                raise ValueError(f"{directory} was saved with {key}={state[key]}, this run has {mine}; "
                                 "resume with the same launch settings (or merge the shards and start anew)")
        arrays = checkpoint.load_rank(directory, self.ps.rank)
        checkpoint.assign_arrays(self.master, arrays, directory)
        self.copy_master_to_model()
        checkpoint.assign_arrays(self.optimizer.m, arrays, directory)
        checkpoint.assign_arrays(self.optimizer.v, arrays, directory)
        self.optimizer.step.set_data(ms.Tensor(int(arrays["optimizer.step"][0]), ms.int32))
        self.loader.restore(arrays["data.position"])
        self.step = state["step"]
        self.scaler.scale, self.scaler.good_steps = state["loss_scale"], state["loss_scale_good_steps"]
        if self.ps.rank == 0:
            logger.info("resumed from %s at step %d", directory, self.step)

    def copy_master_to_model(self) -> None:
        if self.master is not self.params:
            for param, master in zip(self.params, self.master):
                ops.assign(param, master.astype(param.dtype))

    # ---- training ----------------------------------------------------------------------------
    def micro_batch(self):
        """This rank's slice of the next batch and the loss denominator of the whole replica."""
        batch = self.loader.next_batch()
        ids, labels = batch["input_ids"], shift_labels(batch["labels"])
        length = ids.shape[1]
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
        supervised = max(1, int((labels != -100).sum()))
        denominator = float(supervised * self.ps.dp_size * self.args.grad_accum)
        chunk = length // self.ps.sp_size
        part = slice(self.ps.sp_rank * chunk, (self.ps.sp_rank + 1) * chunk)
        return (ms.Tensor(ids[:, part]), ms.Tensor(np.ascontiguousarray(positions[:, part])),
                ms.Tensor(labels[:, part]), ms.Tensor(denominator, ms.float32))

    def train_step(self) -> dict:
        args = self.args
        lr = cosine_lr(self.step, args.lr, args.min_lr, args.warmup_steps, args.max_steps)
        scale = ms.Tensor(self.scaler.scale, ms.float32)
        loss = 0.0
        for _ in range(args.grad_accum - 1):
            loss = loss + self.accumulate(*self.micro_batch(), scale)
        micro_loss, norm, overflow = self.update(*self.micro_batch(), scale, ms.Tensor(lr, ms.float32))
        loss = loss + micro_loss
        if self.allreduce is not None:
            loss = self.allreduce(loss.reshape(1))[0]
        overflow = bool(overflow.asnumpy())
        record = {"step": self.step + 1, "loss": float(loss.asnumpy()), "lr": lr, "grad_norm": float(norm.asnumpy()),
                  "loss_scale": self.scaler.scale, "overflow": overflow}
        self.scaler.update(overflow)
        self.step += 1
        return record

    def train(self) -> None:
        args = self.args
        log_path = Path(args.output_dir) / "log.jsonl"
        if self.ps.rank == 0:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("training %s: %d samples, %d ranks (sp %d, dp %d, zero %d), %d params, steps %d -> %d",
                        args.task, len(self.dataset), self.ps.world_size, self.ps.sp_size, self.ps.dp_size,
                        3 if self.sharded else 0, sum(int(np.prod(s)) for s in self.full_shapes.values()),
                        self.step, args.max_steps)
        while self.step < args.max_steps:
            start = time.perf_counter()
            record = self.train_step()
            record["s_per_step"] = round(time.perf_counter() - start, 4)
            record["truncated"], record["skipped"] = self.dataset.truncated, self.dataset.skipped
            if self.ps.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if record["overflow"]:
                    logger.warning("step %d: fp16 gradient overflow, update skipped, loss scale %g -> %g",
                                   record["step"], record["loss_scale"], self.scaler.scale)
                if record["step"] % args.log_steps == 0 or self.step == args.max_steps:
                    logger.info("step %d/%d loss %.6f lr %.3g grad_norm %.4g scale %g %.3fs/step "
                                "(over-long samples so far: %d truncated, %d skipped)",
                                record["step"], args.max_steps, record["loss"], record["lr"],
                                record["grad_norm"], record["loss_scale"], record["s_per_step"],
                                record["truncated"], record["skipped"])
            if self.step % args.save_steps == 0 or self.step == args.max_steps:
                self.save()


def main(argv=None):
    os.environ.setdefault("GLOG_v", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Run(parse_args(argv)).train()


if __name__ == "__main__":
    main()
