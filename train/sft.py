"""Supervised fine-tuning of Emu3 for text-to-image (T2I) or VQA.

    python -m train.sft --config configs/t2i_sft_8npu.yaml [--option value ...]

launched once per device by msrun (see scripts/t2i_sft_seq_parallel.sh). Every option can be
given in the YAML config and overridden on the command line. Rank 0 writes OUTPUT_DIR/log.jsonl
(one JSON line per step: loss, lr, grad_norm, loss_scale, overflow, s/step) and checkpoints to
OUTPUT_DIR/checkpoints/ (see train/checkpoint.py); `--resume` continues from the latest intact one.
Options, data and the output directory are checked before the model loads; a non-finite loss or
gradient stops the run before anything is saved.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import yaml
from mindspore import ops

from emu3 import backend, checks
from emu3.cli.errors import command
from emu3.cli.outputs import locked
from emu3.weights import atomic_open
from train import checkpoint
from train.dataset import DataLoader, SFTDataset, check_data, shift_labels
from train.parallel import enable_sequence_parallel, init_parallel
from train.trainer import AccumulateGrads, AdamW, GradientCheck, LossAndGrads, LossScaler, TrainStep, cosine_lr
from train.zero import enable_zero3

logger = logging.getLogger("train.sft")
LOG_FILE = "log.jsonl"

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


# Ranges of the numeric options (emu3.checks.number's keywords); every one is checked before anything loads.
RANGES = {
    "max_length": dict(integer=True, low=2), "batch_size": dict(integer=True, low=1),
    "grad_accum": dict(integer=True, low=1), "max_steps": dict(integer=True, low=1),
    "lr": dict(low=0, low_open=True), "min_lr": dict(low=0), "warmup_steps": dict(integer=True, low=0),
    "weight_decay": dict(low=0), "adam_beta1": dict(low=0, high=1, high_open=True),
    "adam_beta2": dict(low=0, high=1, high_open=True), "adam_eps": dict(low=0, low_open=True),
    "max_grad_norm": dict(low=0), "loss_scale": dict(low=1), "loss_scale_window": dict(integer=True, low=1),
    "sp_size": dict(integer=True, low=1), "null_prompt_prob": dict(low=0, high=1),
    "save_steps": dict(integer=True, low=1), "save_total_limit": dict(integer=True, low=0),
    "log_steps": dict(integer=True, low=1), "seed": dict(integer=True, low=0, high=2**32 - 1),
}
CHOICES = {"task": ("t2i", "vqa"), "device": ("CPU", "Ascend"), "mode": ("pynative", "graph"),
           "dtype": ("fp32", "fp16", "bf16"), "attn_implementation": ("eager", "flash_attention_2"),
           "zero_stage": (0, 3)}


def _read_config(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    unknown = set(values) - set(OPTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = _read_config(Path(known.config)) if known.config else {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the options below")
    for name, (kind, default, doc) in OPTIONS.items():
        parser.add_argument(f"--{name}", type=_bool if kind is bool else kind,
                            default=defaults.get(name, default), help=doc)
    args = parser.parse_args(argv)
    for required in ("model_path", "data_path"):
        if getattr(args, required) is None:
            parser.error(f"--{required} is required (on the command line or in the config)")
    check_options(args)
    return args


def check_options(args: argparse.Namespace) -> None:
    """Types, ranges and combinations of every option (a YAML config bypasses argparse's types)."""
    for name, (kind, _, _) in OPTIONS.items():
        value = getattr(args, name)
        if name in RANGES:
            setattr(args, name, checks.number(f"--{name}", value, **RANGES[name]))
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"--{name} must be true or false, got {value!r}")
        elif kind is str and value is not None and not isinstance(value, str):
            raise ValueError(f"--{name} must be a string, got {value!r}")
    for name, choices in CHOICES.items():
        if not (getattr(args, name) is None and OPTIONS[name][1] is None):  # None: MindSpore's default device
            checks.choice(f"--{name}", getattr(args, name), choices)
    if args.min_lr > args.lr:
        raise ValueError(f"--min_lr {args.min_lr} is above --lr {args.lr}")
    if args.warmup_steps > args.max_steps:
        raise ValueError(f"--warmup_steps {args.warmup_steps} exceeds --max_steps {args.max_steps}")
    if args.max_length % args.sp_size:
        raise ValueError(f"--max_length {args.max_length} must be a multiple of --sp_size {args.sp_size}")


def _load_model(args):
    from emu3.mllm.model import Emu3ForCausalLM

    model = Emu3ForCausalLM.from_pretrained(args.model_path, dtype=args.dtype,
                                            attn_implementation=args.attn_implementation)
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
        # Dropout draws from the default generator; ranks hold different tokens (and, inside
        # attention, different heads), so each rank gets its own stream.
        ms.manual_seed(args.seed + self.ps.rank)
        if args.max_length % args.sp_size:
            raise ValueError(f"max_length={args.max_length} must be a multiple of sp_size={args.sp_size}")
        start = time.perf_counter()
        self.model = _load_model(args)
        self.model_config = self.model.config.to_dict()
        if self.ps.sp_size > 1:
            enable_sequence_parallel(self.model, self.ps)
        if args.zero_stage == 3 and self.ps.world_size > 1:
            self.full_shapes = enable_zero3(self.model, self.ps.world_group)
        else:
            self.full_shapes = {p.name: tuple(p.shape) for p in self.model.trainable_params()}
        if args.recompute:  # last: a recompute cell keeps the parameters it sees (ZeRO-3 swaps them)
            self.model.enable_recompute()
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
        self.run_id = None
        self.open_output()
        # Ranks finish loading minutes apart (8 x 17 GB from shared storage); waiting here, under the
        # launcher's HCCL time-outs, keeps the first training collective from timing out instead.
        self.barrier()
        if self.ps.rank == 0:
            logger.info("every rank loaded the model (%.1f s)", time.perf_counter() - start)

    # ---- output directory and checkpoints -----------------------------------------------------
    def open_output(self) -> None:
        """Lock the output directory (rank 0), resume or refuse to overwrite a run, and cut
        log.jsonl back to the step training starts from."""
        self.lock = contextlib.ExitStack()
        if self.ps.rank == 0:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            self.lock.enter_context(locked(self.args.output_dir, "--output_dir", "training"))
        directory, damaged = start_point(self.args)
        if self.ps.rank == 0:
            for bad, why in damaged:
                aside = bad.with_name(bad.name + checkpoint.DAMAGED_SUFFIX)
                os.replace(bad, aside)
                logger.warning("checkpoint %s is damaged (%s); moved aside to %s; resuming from %s instead",
                               bad, why, aside, directory)
            if self.args.resume and directory is None:
                logger.warning("--resume: no checkpoint in %s, starting from scratch", self.args.output_dir)
        if directory is not None:
            self.resume(directory)
        if self.ps.rank == 0:
            _cut_log(Path(self.args.output_dir) / LOG_FILE, self.step)

    def state(self) -> dict:
        return {"step": self.step, "loss_scale": self.scaler.scale, "loss_scale_good_steps": self.scaler.good_steps,
                "world_size": self.ps.world_size, "sp_size": self.ps.sp_size, "zero_stage": 3 if self.sharded else 0,
                "full_shapes": {k: list(v) for k, v in self.full_shapes.items()},
                "model_config": self.model_config, "model": str(Path(self.args.model_path).resolve()),
                "args": vars(self.args)}

    def save(self) -> None:
        tensors = checkpoint.parameter_arrays(self.master)
        self.refuse_non_finite(tensors)
        tensors.update(checkpoint.parameter_arrays(self.optimizer.m))
        tensors.update(checkpoint.parameter_arrays(self.optimizer.v))
        tensors["optimizer.step"] = self.optimizer.step.asnumpy().reshape(1)
        tensors["data.position"] = np.asarray(self.loader.position, np.int64)
        tensors["rng.mindspore"] = ms.get_rng_state().asnumpy()
        if self.run_id is None:
            self.run_id = self.new_run_id()
        path = checkpoint.save(self.args.output_dir, self.step, self.ps.rank, self.barrier, tensors,
                               self.state(), self.args.save_total_limit, self.run_id)
        if self.ps.rank == 0:
            logger.info("saved %s", path)

    def refuse_non_finite(self, weights: dict) -> None:
        """Raise on every rank if any rank's weights hold NaN or inf: such a checkpoint is never written."""
        bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in weights.values())
        if self.allreduce is not None:
            bad = int(self.allreduce(ms.Tensor([float(bad)], ms.float32)).asnumpy()[0])
        if bad:
            raise ValueError(f"step {self.step}: {bad} weights are NaN or infinite; not saving them. "
                             f"The last checkpoint in {Path(self.args.output_dir) / 'checkpoints'} is intact")

    def new_run_id(self) -> str:
        """A random id shared by all ranks (rank 0 draws it; a sum over ranks hands it to the others).
        It comes from os.urandom, so MindSpore's and numpy's generators are untouched."""
        words = np.frombuffer(os.urandom(12), np.uint32) % 2**24 if self.ps.rank == 0 else np.zeros(3)
        if self.allreduce is not None:  # float32 holds integers below 2**24 exactly
            words = self.allreduce(ms.Tensor(words.astype(np.float32))).asnumpy()
        return "".join(f"{int(w):06x}" for w in words)

    def resume(self, directory: Path) -> None:
        state = checkpoint.load_state(directory)
        for key, mine in (("world_size", self.ps.world_size), ("sp_size", self.ps.sp_size),
                          ("zero_stage", 3 if self.sharded else 0)):
            if state[key] != mine:
                raise ValueError(f"{directory} was saved with {key}={state[key]}, this run has {mine}; "
                                 "resume with the same launch settings (or merge the shards and start anew)")
        arrays = checkpoint.load_rank(directory, self.ps.rank, state)
        checkpoint.assign_arrays(self.master, arrays, directory)
        self.copy_master_to_model()
        checkpoint.assign_arrays(self.optimizer.m, arrays, directory)
        checkpoint.assign_arrays(self.optimizer.v, arrays, directory)
        self.optimizer.step.set_data(ms.Tensor(int(arrays["optimizer.step"][0]), ms.int32))
        self.loader.restore(arrays["data.position"])
        # dropout draws from MindSpore's default generator: continue its sequence, not a fresh one
        ms.set_rng_state(ms.Tensor(np.array(arrays["rng.mindspore"])))
        self.step = state["step"]
        self.run_id = state["run_id"]
        self.scaler.scale, self.scaler.good_steps = state["loss_scale"], state["loss_scale_good_steps"]
        if self.ps.rank == 0:
            logger.info("resumed from %s at step %d (run %s, trained from %s)", directory, self.step,
                        self.run_id, state["model"])

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
        log_path = Path(args.output_dir) / LOG_FILE
        if self.ps.rank == 0:
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
                if record["overflow"] and self.scaler.dynamic:
                    logger.warning("step %d: fp16 gradient overflow, update skipped, loss scale %g -> %g",
                                   record["step"], record["loss_scale"], self.scaler.scale)
                if record["step"] % args.log_steps == 0 or self.step == args.max_steps:
                    logger.info("step %d/%d loss %.6f lr %.3g grad_norm %.4g scale %g %.3fs/step "
                                "(over-long samples so far: %d truncated, %d skipped)",
                                record["step"], args.max_steps, record["loss"], record["lr"],
                                record["grad_norm"], record["loss_scale"], record["s_per_step"],
                                record["truncated"], record["skipped"])
            self.stop_if_diverged(record)
            if self.step % args.save_steps == 0 or self.step == args.max_steps:
                self.save()
        self.lock.close()

    def stop_if_diverged(self, record: dict) -> None:
        """A non-finite loss, or gradients that loss scaling cannot bring back, end the run (on
        every rank: loss and overflow flag are global) before anything is saved."""
        checkpoints = Path(self.args.output_dir) / "checkpoints"
        if not math.isfinite(record["loss"]):
            problem = f"the loss is {record['loss']}"
        elif record["overflow"] and not (self.scaler.dynamic and record["loss_scale"] > 1):
            problem = f"the gradients are not finite (loss scale {record['loss_scale']:g})"
        else:
            return
        raise ValueError(f"step {record['step']}: {problem}; training stopped without applying or saving it. "
                         f"Checkpoints in {checkpoints} hold only finite weights: resume from one with a lower "
                         "--lr (or --max_grad_norm), or check the data")


def _cut_log(path: Path, step: int) -> None:
    """Keep the log records of steps up to `step` (those a resumed run does not repeat)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    with atomic_open(path, "w") as f:
        f.writelines(kept)


def start_point(args) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(checkpoint to resume from or None, [(newer damaged checkpoint, why)]) for this run's
    options; ValueError when the output directory belongs to another run, task or model."""
    existing = checkpoint.complete_checkpoints(args.output_dir)
    if not args.resume:
        if existing:
            raise ValueError(f"{args.output_dir} already holds checkpoints (newest {existing[-1].name}): pass "
                             "--resume true to continue that run, or choose another --output_dir")
        return None, []
    directory, damaged = checkpoint.newest_intact(args.output_dir)
    if directory is None:
        if damaged:
            raise ValueError(f"no intact checkpoint in {args.output_dir}: " + "; ".join(
                f"{d.name}: {why}" for d, why in damaged))
        return None, []
    _refuse_other_run(checkpoint.load_state(directory), args, directory)
    return directory, damaged


# Keys of config.json that decide the parameter shapes: a checkpoint fits only the same values.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads")


def _refuse_other_run(state: dict, args, directory: Path) -> None:
    from emu3.mllm.config import Emu3Config

    task = state["args"].get("task")
    if task != args.task:
        raise ValueError(f"{directory} is a checkpoint of a {task} run; this run has --task {args.task}: "
                         "resume with the same task, or choose another --output_dir")
    config = Emu3Config.from_pretrained(args.model_path).to_dict()
    differ = [f"{k} {state['model_config'].get(k)} there, {config[k]} now" for k in _SHAPE_KEYS
              if state["model_config"].get(k) != config[k]]
    if differ:
        raise ValueError(f"{directory} was trained from another model ({', '.join(differ)}): resume with "
                         "its --model_path, or choose another --output_dir")
    before, now = Path(state["model"]), Path(args.model_path).resolve()
    if before != now and before.exists():  # a model that moved away may be given by its new path
        raise ValueError(f"{directory} was trained from {before}, this run names {now}: resume with "
                         f"--model_path {before}, or choose another --output_dir")


@command
def main(argv=None):
    os.environ.setdefault("GLOG_v", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # Everything that can be checked without the model is, before it loads (minutes for Emu3-8B).
    check_data(args.data_path, args.task)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=args.output_dir):  # writable: not found out at the first save
        pass
    start_point(args)
    Run(args).train()


if __name__ == "__main__":
    main()
