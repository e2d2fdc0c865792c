"""The benchmark tables: vision tokenizer, text-to-image, VQA, SFT (as in the public MindSpore
port's README), plus the per-token decode cost and greedy text generation that the fast-generation
design is about, and the issue targets they are measured against.

    python -m emu3.cli.benchmark --config small --mode graph --dtype fp32 --compare-reference

--config tiny|small builds random weights of that shape (full 184,622 vocabulary); a directory
loads real weights in BAAI's layout (with --vq DIR for the vision tokenizer). With
--compare-reference (CPU, tiny/small) transformers' Emu3 (PyTorch) gets the same weights and is
timed in the same run, ours and the reference taking turns; ratios are "ours is faster by".
Timings exclude compilation (each timed call follows a warm-up call with the same shapes). The
tables are printed and written to --output.
"""

import argparse
import gc
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from emu3.cli import options
from emu3.cli.errors import command
from emu3.cli.outputs import check_file

LLM_CONFIGS = {
    "tiny": dict(vocab_size=184622, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=9216),
    "small": dict(vocab_size=184622, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=9216),
}
# Keys of transformers' Emu3VQVAEConfig, whose defaults are BAAI's Emu3-VisionTokenizer ("emu3").
VQ_CONFIGS = {
    "tiny": dict(base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3],
                 hidden_size=32),
    "emu3": {},
}
GUIDANCE = 3.0
TOP_K = 2048
# The greedy text generation that issue 10 measures end to end.
TEXT_PROMPT_TOKENS, TEXT_NEW_TOKENS = 128, 48
# The kernel counter (emu3.generation.kernels) reads only the final actor set of a compiled graph; without this filter,
# save_graphs writes every compiler pass (hundreds of MB for the small model). MindSpore reads it
# once, at start-up: main() sets it before the first import of mindspore.
_DUMP_PASSES = ("MS_DEV_DUMP_IR_PASSES", "final_actor_set")


TABLES = ("vq", "t2i", "decode", "text", "vqa", "sft", "parallel")
DEFAULT_TABLES = TABLES[:-1]


def parse_args(argv=None):
    p = options.ArgumentParser(prog="python -m emu3.cli.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="tiny, small, or a directory with BAAI Emu3 LLM weights")
    p.add_argument("--vq", default=None, help="tiny, emu3 (the real architecture, random weights) or a weights "
                   "directory; default: tiny for --config tiny, emu3 otherwise")
    p.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    p.add_argument("--mode", default="graph", choices=["pynative", "graph"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--attn", default="eager", choices=["eager", "flash_attention_2"])
    p.add_argument("--tables", type=_tables, default=",".join(DEFAULT_TABLES),
                   help=f"comma list of {', '.join(TABLES)} (default {','.join(DEFAULT_TABLES)}; parallel, parallel "
                        "row decoding, generates a 32x32-token image four times)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also time transformers' Emu3 (PyTorch, CPU) with the same weights and print ratios")
    p.add_argument("--threads", type=options.integer(low=1), default=os.cpu_count(),
                   help="CPU threads for both frameworks")
    p.add_argument("--image-tokens", type=_size_text(), default="8x8",
                   help="text-to-image size HxW in tokens (90x90 = 720x720)")
    p.add_argument("--positions", type=_positions, default="100,4000",
                   help="cache positions for the per-token decode cost")
    p.add_argument("--decode-steps", type=options.integer(low=1), default=32, help="timed decode steps per position")
    p.add_argument("--vq-resolution", type=_size_text(multiple=8), default="128x128",
                   help="HxW pixels of the vision tokenizer benchmark (multiples of 8)")
    p.add_argument("--vq-batch", type=options.integer(low=1), default=1)
    p.add_argument("--vqa-image-tokens", type=_size_text(), default="16x16", help="HxW tokens of the VQA prompt's image")
    p.add_argument("--answer-tokens", type=options.integer(low=1), default=32)
    p.add_argument("--sft-seq-len", type=options.integer(low=2), default=256)
    p.add_argument("--sft-config", default=None,
                   help="the SFT table's model: tiny, small or a directory (default: tiny with a random --config "
                        "(the small SFT step and its reference do not fit in 24 GB), else --config)")
    p.add_argument("--repeats", type=options.integer(low=1), default=3,
                   help="timed repetitions (the median is reported)")
    p.add_argument("--output", default="benchmark_results.md")
    return p.parse_args(argv)


def _tables(text: str) -> str:
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TABLES))
    if not wanted or unknown:
        raise argparse.ArgumentTypeError(f"unknown tables {unknown}; choose from {', '.join(TABLES)}" if unknown
                                         else "name at least one table")
    return text


def _size_text(multiple: int = 1):
    """An argparse type: 'HxW' with positive sides (multiples of `multiple`), kept as text."""

    def parse(text: str) -> str:
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 and int(p) % multiple == 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"must be HxW with two positive integers{f' that are multiples of {multiple}' * (multiple > 1)}, "
                f"got {text!r}")
        return text

    return parse


def _positions(text: str) -> str:
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers, got {text!r}")
    return text


def check_args(args) -> None:
    """What parsing cannot see: the weights directories and the output file, before any model is built."""
    if args.config not in LLM_CONFIGS and not Path(args.config).is_dir():
        raise ValueError(f"--config {args.config} is neither {' nor '.join(LLM_CONFIGS)} nor a directory")
    if args.vq is not None and args.vq not in VQ_CONFIGS and not Path(args.vq).is_dir():
        raise ValueError(f"--vq {args.vq} is neither {' nor '.join(VQ_CONFIGS)} nor a directory")
    if args.compare_reference and args.device != "CPU":
        raise ValueError("--compare-reference runs the PyTorch reference on the CPU: use --device CPU")
    if args.compare_reference and args.config not in LLM_CONFIGS:
        raise ValueError("--compare-reference builds both models from the same random weights: use --config tiny "
                         "or small")
    if args.sft_config is not None and args.sft_config not in LLM_CONFIGS and not Path(args.sft_config).is_dir():
        raise ValueError(f"--sft-config {args.sft_config} is neither {' nor '.join(LLM_CONFIGS)} nor a directory")
    check_file(args.output, "--output")


def _size(text: str):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def _median_seconds(fns: dict, repeats: int, warmup: int = 1, cpu: dict | None = None) -> dict:
    """Median wall time of each of `fns` (name: callable that synchronises), after `warmup`
    untimed calls each for compilation and allocations. The callables take turns, so that ours and
    the reference see the same load when other processes share the machine; the median ignores
    the outliers. `cpu`, if given, receives the median CPU time of this process during each call
    (every thread's), which moves less than wall time when other jobs share the cores."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.update({name: float(np.median(t)) for name, t in cpu_times.items()})
    return {name: float(np.median(t)) for name, t in times.items()}


def _table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ratio(reference_s, ours_s):
    return f"{reference_s / ours_s:.2f}x"


class Bench:
    """Builds the models once (ours, and the PyTorch reference with the same weights) and times them."""

    def __init__(self, args):
        import mindspore as ms
        from emu3 import backend

        self.args = args
        self.ms = ms
        backend.set_run_mode(args.mode, args.device)
        if args.device == "CPU":
            ms.set_context(runtime_num_threads=args.threads)
        self.dtype_name = args.dtype
        self.tmp = tempfile.TemporaryDirectory(prefix="emu3-bench-")
        self.torch = None
        if args.compare_reference:
            import torch
            torch.set_num_threads(args.threads)
            torch.manual_seed(0)
            self.torch = torch
        self._llm = self._reference_llm = self._vq = self._reference_vq = self._sft_llms = None

    # ----- models

    def llm(self):
        """The inference model, its projections fused as the inference commands load it."""
        if self._llm is None:
            self._llm, self._reference_llm = self._build_llm(self.args.config)
            self._llm.fuse_projections()
        return self._llm

    def sft_llm(self):
        """(ours, reference or None) for the SFT table: --sft-config (see parse_args)."""
        a = self.args
        name = a.sft_config or ("tiny" if a.config in LLM_CONFIGS else a.config)
        if self._sft_llms is None:  # its own model: train/ trains the unfused projections
            self._sft_llms = self._build_llm(name)
        return self._sft_llms

    def _build_llm(self, name):
        """Ours and, with --compare-reference, transformers' Emu3 holding the same random weights."""
        from emu3 import weights
        from emu3.mllm.config import Emu3Config
        from emu3.mllm.model import Emu3ForCausalLM
        a = self.args
        if name not in LLM_CONFIGS:
            return Emu3ForCausalLM.from_pretrained(name, dtype=a.dtype, attn_implementation=a.attn), None
        config = Emu3Config(**LLM_CONFIGS[name])
        if self.torch is None:
            return Emu3ForCausalLM(config, dtype=a.dtype, attn_implementation=a.attn), None
        from transformers import Emu3ForCausalLM as TorchEmu3ForCausalLM, Emu3TextConfig
        reference = TorchEmu3ForCausalLM(Emu3TextConfig(
            **LLM_CONFIGS[name], rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
            pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id)).eval()
        directory = Path(self.tmp.name) / name
        weights.write_checkpoint({k: v.numpy() for k, v in reference.state_dict().items()}, directory,
                                 config.to_dict())
        return Emu3ForCausalLM.from_pretrained(directory, dtype=a.dtype, attn_implementation=a.attn), reference

    def vq(self):
        if self._vq is None:
            from emu3.tokenizer import Emu3VisionVQModel
            a = self.args
            name = a.vq or ("tiny" if a.config == "tiny" else "emu3")
            if name not in VQ_CONFIGS:
                self._vq = Emu3VisionVQModel.from_pretrained(name, dtype=a.dtype)
                self.vq_name = Path(name).name
                return self._vq
            self.vq_name = f"{name} (random weights)"
            from transformers import Emu3VQVAE, Emu3VQVAEConfig
            import torch
            torch.manual_seed(0)
            reference = Emu3VQVAE(Emu3VQVAEConfig(**VQ_CONFIGS[name])).eval()
            directory = Path(self.tmp.name) / "vq"
            reference.save_pretrained(directory, safe_serialization=True)
            self._vq = Emu3VisionVQModel.from_pretrained(directory, dtype=a.dtype)
            self._reference_vq = reference if self.torch is not None else None
        return self._vq

    @property
    def llm_name(self):
        return _model_name(self.args.config)

    # ----- tables

    def vq_table(self):
        a = self.args
        model = self.vq()
        h, w = _size(a.vq_resolution)
        images = np.random.default_rng(0).uniform(-1, 1, (a.vq_batch, 3, h, w)).astype(np.float32)

        def ours():
            model.decode(model.encode(images)).asnumpy()

        fns = {"ours": ours}
        if self._reference_vq is not None:
            torch = self.torch
            reference = self._reference_vq
            x = torch.from_numpy(images)
            sizes = torch.tensor([[h, w]] * a.vq_batch)

            def theirs():
                with torch.no_grad():
                    reference.decode(torch.stack(reference.encode(x, sizes)))

            fns["reference"] = theirs
        medians = _median_seconds(fns, a.repeats)
        seconds = medians["ours"]
        header = ["mode", "model", "precision", "batch", "resolution", "s/step", "img/s"]
        row = [a.mode, f"VisionTokenizer {self.vq_name}", a.dtype, a.vq_batch, f"{h}x{w}", f"{seconds:.3f}",
               f"{a.vq_batch / seconds:.2f}"]
        if "reference" in medians:
            ref_seconds = medians["reference"]
            header += ["reference s/step", "speed-up"]
            row += [f"{ref_seconds:.3f}", _ratio(ref_seconds, seconds)]
            self.targets.append(("5", "vision tokenizer encode+decode speed-up >= 2x", ref_seconds / seconds, 2.0))
        return _table("Vision tokenizer (image encode + decode)", header, [row])

    def _image_prompt(self, text_tokens: int, h: int, w: int):
        """A mode-G shaped prompt: bos, text, boi, 'H*W' digits, img (random text ids)."""
        c = self.llm().config
        rng = np.random.default_rng(1)
        digits = [15 + int(d) for d in str(h)] + [9] + [15 + int(d) for d in str(w)]  # Qwen ids of '0'-'9', '*'
        return np.array([[c.bos_token_id, *rng.integers(0, 151643, text_tokens), c.boi_token_id, *digits,
                          c.img_token_id]], np.int64)

    def t2i_table(self):
        from emu3.generation import GenerationConfig, build_prefix_constraint, generate
        a = self.args
        model = self.llm()
        h, w = _size(a.image_tokens)
        steps = (w + 1) * h + 3
        prompt = self._image_prompt(24, h, w)
        negative = self._image_prompt(40, h, w)
        settings = {
            "greedy": GenerationConfig(max_new_tokens=steps, guidance_scale=GUIDANCE),
            f"top-k {TOP_K} sampling": GenerationConfig(max_new_tokens=steps, guidance_scale=GUIDANCE,
                                                        do_sample=True, top_k=TOP_K, seed=0),
        }
        header = ["model", "precision", "batch", "image (tokens)", "CFG", "decoding", "steps", "tokens/s"]
        if self.torch is not None:
            header += ["reference tokens/s", "speed-up", "tokens identical"]
        rows = []
        compile_counts = []
        for name, config in settings.items():
            # Warm-up: a 1x2 image's first three tokens (visual, visual, the forced eol) compile the
            # prefill and both image steps (visual columns, forced token) with the timed call's shapes.
            warm = GenerationConfig(**{**config.__dict__, "max_new_tokens": 3})
            compile_counts.append(self._count_compiles(
                lambda: generate(model, prompt, config=warm, negative_input_ids=negative, image_size=(1, 2),
                                 progress=False)))
            start = time.perf_counter()
            out = []
            compile_counts.append(self._count_compiles(lambda: out.append(generate(
                model, prompt, config=config, negative_input_ids=negative, image_size=(h, w), progress=True))))
            seconds = time.perf_counter() - start
            new = out[0].shape[1] - prompt.shape[1]
            row = [self.llm_name, a.dtype, 1, f"{h}x{w}", GUIDANCE, name, new, f"{new / seconds:.2f}"]
            if self.torch is not None:
                torch = self.torch
                kwargs = dict(max_new_tokens=steps, guidance_scale=GUIDANCE,
                              negative_prompt_ids=torch.from_numpy(negative),
                              prefix_allowed_tokens_fn=build_prefix_constraint(h, w, model.config),
                              eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
                kwargs.update(dict(do_sample=True, top_k=TOP_K) if config.do_sample else dict(do_sample=False))
                start = time.perf_counter()
                with torch.no_grad():
                    ref = self._reference_llm.generate(torch.from_numpy(prompt), **kwargs).numpy()
                ref_seconds = time.perf_counter() - start
                ref_new = ref.shape[1] - prompt.shape[1]
                same = "yes" if np.array_equal(ref, out[0]) else "no"
                row += [f"{ref_new / ref_seconds:.2f}", _ratio(ref_seconds / ref_new, seconds / new),
                        same if not config.do_sample else "n/a (sampled)"]
                if not config.do_sample:
                    self.targets.append(("5, 10", "greedy CFG image tokens identical to transformers",
                                         float(same == "yes"), 1.0))
            rows.append(row)
        if a.mode == "graph":
            for (name, _), warm_count, timed_count in zip(settings.items(), compile_counts[::2], compile_counts[1::2]):
                self.notes.append(f"graph compilations, text-to-image {name}: warm-up call (3 tokens) {warm_count}, "
                                  f"timed call ({steps} tokens) {timed_count}")
                self.targets.append(("5, 10", f"graph compilations for the full image, {name} (after a 3-token "
                                     "warm-up)", timed_count, 0))
        return _table("Text-to-image (classifier-free guidance 3.0, image constraint)", header, rows)

    def _count_compiles(self, fn) -> int:
        from emu3.generation.kernels import compilations
        with compilations() as fresh:
            fn()
        return sum(fresh)

    def decode_table(self):
        a = self.args
        positions = [int(p) for p in a.positions.split(",")]
        max_length = max(positions) + a.decode_steps + 8
        kinds = [("text", False, False), ("image", False, True), ("image + CFG", True, True)]
        header = ["position", "decode", "ms/token", "tokens/s", "kernels per step"]
        if self.torch is not None:
            header += ["reference ms/token", "speed-up", "CPU-time speed-up"]
        rows, medians, cpu, kernels = [], {}, {}, {}
        for kind, guided, constrained in kinds:
            steps = {}
            for position in positions:
                steps[kind, position], kernels[kind, position] = self._our_decode_step(position, max_length, guided,
                                                                                       constrained)
                if self.torch is not None:
                    steps[kind, position, "ref"] = self._reference_decode_step(position, guided, constrained)
            medians.update(_median_seconds(steps, a.decode_steps, warmup=2, cpu=cpu))
            for position in positions:
                seconds = medians[kind, position]
                count = kernels[kind, position]
                row = [position, kind, f"{seconds * 1e3:.1f}", f"{1 / seconds:.2f}", "n/a" if count is None else count]
                if self.torch is not None:
                    ref = medians[kind, position, "ref"]
                    row += [f"{ref * 1e3:.1f}", _ratio(ref, seconds), _ratio(cpu[kind, position, "ref"],
                                                                              cpu[kind, position])]
                rows.append(row)
            del steps
            gc.collect()
        low, high = min(positions), max(positions)
        self.targets.append(("5", f"decode cost at position {high} / at {low} (text) <= 1.3",
                             medians["text", high] / medians["text", low], 1.3))
        for position in positions:
            self.targets.append(("5", f"image decode with CFG / without at position {position} <= 1.3",
                                 medians["image + CFG", position] / medians["image", position], 1.3))
        if self.torch is not None:
            for position in positions:
                speedup = {kind: medians[kind, position, "ref"] / medians[kind, position] for kind, _, _ in kinds}
                self.targets.append(("5", f"decode tokens/s vs reference at position {position} (text) >= 1.0",
                                     speedup["text"], 1.0))
                self.targets.append(("5", f"decode tokens/s vs reference at position {position} (image + CFG) >= 1.0",
                                     speedup["image + CFG"], 1.0))
                if position == 100:
                    self.targets += [
                        ("10", "text decode at position 100 vs reference >= 1.05", speedup["text"], 1.05),
                        ("10", "image decode, constrained, no CFG, position 100 vs reference >= 1.5",
                         speedup["image"], 1.5),
                        ("10", "image decode with CFG, position 100 vs reference >= 2.5", speedup["image + CFG"], 2.5)]
        note = (f"median of {a.decode_steps} steps from cache position p (static cache of {max_length} slots, batch 1; "
                f"CFG = 2 rows), ours and the reference's steps taking turns; an image step is one where a visual "
                f"token is due (lm_head over the 32,768 visual rows); the reference's step is its forward with a "
                f"DynamicCache of p entries plus, for CFG, the second forward of transformers' "
                f"UnbatchedClassifierFreeGuidanceLogitsProcessor, its PrefixConstrainedLogitsProcessor and argmax. "
                f"Kernels per step: the kernel actors of our compiled step graph (count_kernels). CPU-time "
                f"speed-up: the same ratio of the CPU time this process spent per step (all threads).")
        return _table("Decode cost per token", header, rows) + f"\n{note}\n"

    def _our_decode_step(self, position, max_length, guided, constrained):
        """(a callable that runs our next decode step from cache position `position` on, the kernels
        per step). Image steps are the ones where a visual token is due."""
        ms = self.ms
        from emu3 import backend
        from emu3.generation import GenerationConfig
        from emu3.generation.constraints import VISUAL
        from emu3.generation.generate import TEXT, VISUAL_STEP, GenerationStep
        from emu3.generation.kernels import count_kernels
        model = self.llm()
        c = model.config
        rows = 2 if guided else 1
        step = GenerationStep(model, model.init_cache(rows, max_length),
                              GenerationConfig(guidance_scale=GUIDANCE if guided else None), constrained,
                              c.eos_token_id, c.pad_token_id)
        if constrained:
            step.visual_head.load(model.lm_head.weight)
        calls = self.args.decode_steps + 3  # the counted call, 2 warm-up calls, the timed ones
        state = {
            "ids": ms.Tensor(np.full((rows, 1), c.eoi_token_id + 1, np.int32)),
            "pos": ms.Tensor(np.full((rows, 1), position, np.int32)),
            "slot": ms.Tensor(np.array([position], np.int32)),
            "loop": (ms.Tensor(np.zeros(1, np.int32)), ms.Tensor(np.ones(1, np.bool_))),
        }
        mask = ms.Tensor(np.ones((rows, max_length), np.int32))
        constants = (ms.Tensor(np.full((calls, 1), VISUAL, np.int32)), ms.Tensor(np.zeros((1, 1), np.float32)))
        kind = VISUAL_STEP if constrained else TEXT

        # The window generate() reads at the last timed step (the steps from `position` are timed).
        last_slot = position + calls - 1
        window = next(w for w in backend.cache_windows(max_length) if w > last_slot)

        def one():
            tokens, state["ids"], state["pos"], state["slot"], *loop = step(
                state["ids"], state["pos"], state["slot"], mask, *state["loop"], *constants, window, kind)
            state["loop"] = tuple(loop)
            tokens.asnumpy()

        kernels = None
        if self.args.mode == "graph":  # on the fresh step: its first call compiles the graph counted
            kernels = sum(count_kernels(step, state["ids"], state["pos"], state["slot"], mask, *state["loop"],
                                        *constants, window, kind).values())
        return one, kernels

    def _reference_decode_step(self, position, guided, constrained):
        """The same for transformers' model: its forward with a DynamicCache of `position` entries."""
        torch = self.torch
        from transformers import DynamicCache
        from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor
        from emu3.generation import build_prefix_constraint
        reference = self._reference_llm
        c = self.llm().config
        kv_heads, head_dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads

        def filled_cache():
            cache = DynamicCache()
            for layer in range(c.num_hidden_layers):
                cache.update(torch.randn(1, kv_heads, position, head_dim), torch.randn(1, kv_heads, position, head_dim),
                             layer)
            return cache

        caches = [filled_cache() for _ in range(2 if guided else 1)]
        prefix = PrefixConstrainedLogitsProcessor(build_prefix_constraint(90, 90, c), 1) if constrained else None
        history = torch.full((1, position), c.eoi_token_id + 1)
        history[0, 0] = c.img_token_id
        token = torch.tensor([[c.eoi_token_id + 1]])

        positions = iter(range(position, position + 2 + self.args.decode_steps))

        @torch.no_grad()
        def one():
            nonlocal history, token
            p = next(positions)
            kwargs = dict(position_ids=torch.tensor([[p]]), attention_mask=torch.ones(1, p + 1, dtype=torch.long),
                          use_cache=True)
            scores = reference(input_ids=token, past_key_values=caches[0], **kwargs).logits[:, -1].float()
            if guided:
                uncond = torch.log_softmax(reference(input_ids=token, past_key_values=caches[1], **kwargs)
                                           .logits[:, -1].float(), -1)
                scores = GUIDANCE * (torch.log_softmax(scores, -1) - uncond) + uncond
            if prefix is not None:
                scores = prefix(history, scores)
            token = scores.argmax(-1, keepdim=True)
            history = torch.cat([history, token], 1)

        return one

    def _generation_row(self, prompt, config, reference_kwargs):
        """Ours and the reference's greedy generate, timed taking turns (median after a warm-up call
        each): (header, row, speed-up, identical tokens); the last two are None without the reference."""
        from emu3.generation import generate
        a = self.args
        outputs = {}

        def ours():
            outputs["ours"] = generate(self.llm(), prompt, config=config, progress=False)

        fns = {"ours": ours}
        if self.torch is not None:
            torch = self.torch

            def theirs():
                with torch.no_grad():
                    outputs["reference"] = self._reference_llm.generate(torch.from_numpy(prompt), do_sample=False,
                                                                        **reference_kwargs).numpy()

            fns["reference"] = theirs
        cpu = {}
        medians = _median_seconds(fns, a.repeats, cpu=cpu)
        new = outputs["ours"].shape[1] - prompt.shape[1]
        header = ["model", "precision", "batch", "prompt tokens", "new tokens", "tokens/s (incl. prefill)"]
        row = [self.llm_name, a.dtype, 1, prompt.shape[1], new, f"{new / medians['ours']:.2f}"]
        if self.torch is None:
            return header, row, None, None
        ref_new = outputs["reference"].shape[1] - prompt.shape[1]
        speedup = (medians["reference"] / ref_new) / (medians["ours"] / new)
        header += ["reference tokens/s", "speed-up", "CPU-time speed-up"]
        row += [f"{ref_new / medians['reference']:.2f}", f"{speedup:.2f}x",
                f"{(cpu['reference'] / ref_new) / (cpu['ours'] / new):.2f}x"]
        return header, row, speedup, np.array_equal(outputs["ours"], outputs["reference"])

    def text_table(self):
        """Greedy generation end to end, prompt and new tokens as in issue 10, tokens compared."""
        from emu3.generation import GenerationConfig
        c = self.llm().config
        rng = np.random.default_rng(4)
        prompt = np.array([[c.bos_token_id, *rng.integers(0, 151643, TEXT_PROMPT_TOKENS - 1)]], np.int64)
        eos = self._absent_token(prompt, TEXT_NEW_TOKENS)  # all 48 tokens, whatever the random weights say
        header, row, speedup, same = self._generation_row(
            prompt, GenerationConfig(max_new_tokens=TEXT_NEW_TOKENS, eos_token_id=eos),
            dict(max_new_tokens=TEXT_NEW_TOKENS, eos_token_id=eos, pad_token_id=c.pad_token_id))
        if speedup is not None:
            header.append("tokens identical")
            row.append("yes" if same else "no")
            self.targets += [
                ("10", f"greedy generation end to end (prompt {TEXT_PROMPT_TOKENS}, {TEXT_NEW_TOKENS} new tokens) "
                 "vs reference >= 1.0", speedup, 1.0),
                ("10", "greedy text tokens identical to transformers", float(same), 1.0)]
        return _table("Greedy text generation (end to end, prefill included)", header, [row]) + \
            _turns_note(self.args.repeats)

    def vqa_table(self):
        from emu3.generation import GenerationConfig
        a = self.args
        c = self.llm().config
        h, w = _size(a.vqa_image_tokens)
        rng = np.random.default_rng(2)
        visual = rng.integers(c.eoi_token_id + 1, c.eoi_token_id + 1 + 32768, (h, w))
        image = [c.boi_token_id, 15, 9, 15, c.img_token_id,
                 *np.concatenate([visual, np.full((h, 1), c.eol_token_id)], 1).ravel(), c.eof_token_id,
                 c.eoi_token_id]
        prompt = np.array([[c.bos_token_id, *rng.integers(0, 151643, 12), *image, *rng.integers(0, 151643, 16)]],
                          np.int64)
        # Every answer is answer_tokens long: random weights may say eos at any point, so both stop
        # at an id that this greedy answer does not contain.
        eos = self._absent_token(prompt, a.answer_tokens)
        header, row, speedup, _ = self._generation_row(
            prompt, GenerationConfig(max_new_tokens=a.answer_tokens, eos_token_id=eos),
            dict(max_new_tokens=a.answer_tokens, eos_token_id=eos, pad_token_id=c.pad_token_id))
        if speedup is not None:
            self.targets.append(("10", "VQA with its prefill vs reference >= 1.0", speedup, 1.0))
        return _table(f"VQA (greedy answer after a {h}x{w}-token image and a question)", header, [row]) + \
            _turns_note(a.repeats)

    def _absent_token(self, prompt, new_tokens: int) -> int:
        """A token id that greedy decoding after `prompt` does not produce in `new_tokens` tokens
        (greedy tokens up to an eos do not depend on which id is the eos)."""
        from emu3.generation import GenerationConfig, generate
        c = self.llm().config
        for candidate in (c.img_token_id, c.boi_token_id, c.eof_token_id, c.eol_token_id):
            out = generate(self.llm(), prompt, config=GenerationConfig(max_new_tokens=new_tokens,
                                                                       eos_token_id=candidate),
                           progress=False)[0, prompt.shape[1]:]
            if len(out) == new_tokens and candidate not in out:
                return candidate
        raise ValueError("every candidate eos id appears in the greedy answer")

    def sft_table(self):
        a = self.args
        model, reference = self.sft_llm()
        name = a.sft_config or ("tiny" if a.config in LLM_CONFIGS else a.config)
        rng = np.random.default_rng(3)
        ids = rng.integers(0, model.config.vocab_size, (1, a.sft_seq_len)).astype(np.int32)
        labels = ids.copy()
        labels[:, : a.sft_seq_len // 4] = -100  # the prompt part carries no loss, as in SFT
        fns = {"ours": self._our_sft_step(model, ids, labels)}
        if reference is not None:
            fns["reference"] = self._reference_sft_step(reference, ids, labels)
        model.set_train(True)
        cpu = {}
        try:
            medians = _median_seconds(fns, a.repeats, cpu=cpu)
        finally:
            model.set_train(False)
            if reference is not None:
                reference.eval()
            del fns
            gc.collect()
        seconds = medians["ours"]
        header = ["mode", "model", "precision", "batch", "tokens", "s/step", "samples/s"]
        row = [a.mode, _model_name(name), a.dtype, 1, a.sft_seq_len, f"{seconds:.3f}", f"{1 / seconds:.3f}"]
        if reference is not None:
            header += ["reference s/step", "speed-up", "CPU-time speed-up"]
            row += [f"{medians['reference']:.3f}", _ratio(medians["reference"], seconds),
                    _ratio(cpu["reference"], cpu["ours"])]
            self.targets.append(("10", f"SFT step, {name} config, vs reference >= 0.8", medians["reference"] / seconds,
                                 0.8))
        note = (f"one step = forward, backward, global gradient norm, clipping to 1.0 and AdamW (lr 1e-5, weight "
                f"decay 0.1 on matrices) of every parameter: ours is train/'s TrainStep (one graph), the reference "
                f"torch's loss.backward, clip_grad_norm_ and AdamW; dropout active; median of {a.repeats} steps "
                f"each, taking turns")
        return _table("SFT step", header, [row]) + f"\n{note}\n"

    def _our_sft_step(self, model, ids, labels):
        ms = self.ms
        from train.dataset import shift_labels
        from train.parallel import ParallelState
        from train.trainer import AdamW, GradientCheck, LossAndGrads, TrainStep
        params = model.trainable_params()
        low = self.args.dtype != "fp32"
        # fp16/bf16 weights: AdamW updates fp32 master copies, as train.sft does.
        master = [ms.Parameter(p.astype(ms.float32), name=p.name) for p in params] if low else params
        step = TrainStep(LossAndGrads(model, params),
                         GradientCheck(ParallelState(), False, scaled=False, low_precision=low),
                         AdamW(master, {p.name: tuple(p.shape) for p in params}, weight_decay=0.1), max_grad_norm=1.0)
        shifted = shift_labels(labels)
        inputs = (ms.Tensor(ids), ms.Tensor(np.arange(ids.shape[1], dtype=np.int32)[None]), ms.Tensor(shifted),
                  ms.Tensor(float((shifted != -100).sum()), ms.float32), ms.Tensor(1.0, ms.float32),
                  ms.Tensor(1e-5, ms.float32))
        return lambda: step(*inputs)[0].asnumpy()

    def _reference_sft_step(self, reference, ids, labels):
        torch = self.torch
        reference.train()
        optimizer = torch.optim.AdamW([
            {"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=1e-5,
            betas=(0.9, 0.95), eps=1e-8)
        inputs = torch.from_numpy(ids).long()
        targets = torch.from_numpy(labels).long()

        def step():
            loss = reference(input_ids=inputs, labels=targets).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()

        return step

    def parallel_table(self):
        """Parallel row decoding (issue 11): the forward passes of a 90x90-token image, counted from the
        schedule (the count is tested against the decode loop), and the wall time of a 32x32-token image
        with CFG, sequential and parallel taking turns in the same run. Greedy, batch 1."""
        from emu3.generation import GenerationConfig, generate
        from emu3.generation.parallel_rows import RowSchedule, image_passes
        a = self.args
        windows = (4, 8, 16)
        header = ["image (tokens)", "decoding", "forward passes", "of sequential", "rows per pass (at most)"]
        sequential = image_passes(90, 90, None)
        rows = [["90x90", "sequential", sequential, "100%", 1]]
        for window in windows:
            schedule = RowSchedule(90, 90, window)
            rows.append(["90x90", f"window {window}", schedule.passes, f"{100 * schedule.passes / sequential:.1f}%",
                         schedule.lanes])
        at_16 = image_passes(90, 90, 16) / sequential
        part = _table("Parallel row decoding: forward passes (the prefill included)", header, rows)

        model = self.llm()
        c = model.config
        h = w = 32
        new = (w + 1) * h + 3
        prompt, negative = self._image_prompt(24, h, w), self._image_prompt(40, h, w)
        outputs = {}

        def generated(window, tokens):
            config = GenerationConfig(max_new_tokens=tokens, guidance_scale=GUIDANCE, parallel_window=window)
            outputs[window] = generate(model, prompt, config=config, negative_input_ids=negative, image_size=(h, w),
                                       progress=False)[0, prompt.shape[1]:]

        settings = (None, *windows)
        # Untimed runs compile every graph first. Sequential decoding sizes its cache (and so its graphs)
        # by max_new_tokens, so it needs the whole image; parallel decoding sizes it by the image.
        for window in settings:
            generated(window, new if window is None else 300)
        medians = {}
        compiles = self._count_compiles(lambda: medians.update(_median_seconds(
            {window: lambda window=window: generated(window, new) for window in settings}, a.repeats, warmup=0)))
        grid = {window: out[:(w + 1) * h].reshape(h, w + 1) for window, out in outputs.items()}
        rows = []
        for window in settings:
            passes, seconds = image_passes(h, w, window), medians[window]
            well_formed = ((grid[window][:, :w] > c.eoi_token_id).all() and (grid[window][:, w] == c.eol_token_id).all()
                           and outputs[window][-3:].tolist() == [c.eof_token_id, c.eoi_token_id, c.eos_token_id])
            rows.append([self.llm_name, a.dtype, f"{h}x{w}", GUIDANCE, "sequential" if window is None else
                         f"window {window}", passes, f"{seconds:.1f}", f"{1e3 * seconds / passes:.0f}",
                         _ratio(medians[None], seconds), "yes" if well_formed else "NO"])
        part += "\n" + _table("Parallel row decoding: wall time (classifier-free guidance 3.0, greedy, batch 1)",
                              ["model", "precision", "image (tokens)", "CFG", "decoding", "forward passes", "s",
                               "ms/pass", "speed-up", "image well formed"], rows)
        part += (f"\nmedian of {a.repeats} run(s) per setting, the settings taking turns; graph compilations "
                 f"during the timed runs: {compiles} (untimed runs compile first)\n")
        self.targets += [("11", "forward passes of a 90x90-token image at window 16 / sequential <= 0.2", at_16, 0.2),
                         ("11", "wall time speed-up of a 32x32-token image with CFG at window 8 >= 2.5",
                          medians[None] / medians[8], 2.5)]
        return part

    def run(self):
        self.targets, self.notes = [], []
        tables = {"vq": self.vq_table, "t2i": self.t2i_table, "decode": self.decode_table, "text": self.text_table,
                  "vqa": self.vqa_table, "sft": self.sft_table, "parallel": self.parallel_table}
        wanted = [t.strip() for t in self.args.tables.split(",") if t.strip()]
        parts = [_header(self.args)]
        output = Path(self.args.output)
        for name in wanted:
            part = tables[name]()
            print(part, flush=True)
            parts.append(part)
            output.write_text("\n".join(parts))  # as it goes: a later table's failure keeps the earlier ones
        if self.targets:
            rows = [[issue, name, f"{value:.2f}",
                     ("<= " if "<=" in name else ">= " if ">=" in name else "= ") + f"{goal:g}",
                     "yes" if _met(name, value, goal) else "NO"] for issue, name, value, goal in self.targets]
            part = _table("Targets", ["issue", "target", "measured", "goal", "met"], rows)
            print(part)
            parts.append(part)
        self.notes.append(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for note in self.notes:
            parts.append(f"- {note}\n")
        print("".join(f"- {note}\n" for note in self.notes))
        output.write_text("\n".join(parts))
        print(f"written to {output}")


def _turns_note(repeats):
    return (f"\nmedian of {repeats} runs each, ours and the reference's taking turns; CPU-time speed-up: the same "
            f"ratio of the CPU time this process spent (all threads)\n")


def _model_name(config):
    return f"{config} (random weights)" if config in LLM_CONFIGS else Path(config).name


def _met(name, value, goal):
    if "<=" in name:
        return value <= goal
    if ">=" in name:
        return value >= goal
    return value == goal


def _header(args):
    import mindspore as ms
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = f"mindspore {ms.__version__}"
    if args.compare_reference:
        import torch
        import transformers
        versions += f", reference: torch {torch.__version__}, transformers {transformers.__version__}"
    return (f"## emu3-mindspore benchmark\n\nmachine: {args.device}, {cpu}, {os.cpu_count()} cores, "
            f"{args.threads} threads, load average (1 min) at the start {os.getloadavg()[0]:.1f}; {versions}\n"
            f"config: {args.config}, mode {args.mode}, dtype {args.dtype}, attention {args.attn}\n")


@command
def main(argv=None):
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault(*_DUMP_PASSES)
    args = parse_args(argv)
    check_args(args)
    Bench(args).run()


if __name__ == "__main__":
    main()
