"""The parallel row decoding pass compiled for Ascend (flash attention over several queries per row,
the fused RMSNorm, the window before the scratch slots) on the CPU: it must fail only at kernel
selection. In fp16: a bf16 cache cannot even be allocated on the CPU."""

import numpy as np
import mindspore as ms

from emu3.generation.generate import GenerationConfig, GenerationStep
from emu3.generation.parallel_rows import ParallelRowStep, RowSchedule
from emu3.mllm.config import Emu3Config
from emu3.mllm.model import Emu3ForCausalLM
from tests.ascend.compile_check import ascend_switch, unsupported_on_cpu


def test_a_parallel_row_pass_compiles_for_ascend():
    config = Emu3Config(vocab_size=184622, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    schedule = RowSchedule(3, 4, 2)
    lanes, prompt, slots = schedule.lanes, 8, 64
    usable = slots - lanes
    with ascend_switch():
        model = Emu3ForCausalLM(config, dtype="fp16", attn_implementation="flash_attention_2")
        settings = GenerationConfig(guidance_scale=3.0, do_sample=True, top_k=8)
        step = GenerationStep(model, model.init_cache(2, slots), settings, True, config.eos_token_id,
                              config.pad_token_id)
        fed_pass = np.full((2, slots), np.iinfo(np.int32).max, np.int32)
        fed_pass[:, :prompt] = 0
        inputs = (ms.Tensor(np.full((1, lanes), config.eoi_token_id + 1, np.int32)), ms.Tensor(np.array([2], np.int32)),
                  ms.Tensor(schedule.fed), ms.Tensor(fed_pass), ms.Tensor(np.full((2, 1), prompt - 1, np.int32)),
                  ms.Tensor(np.array([prompt - 1], np.int32)), ms.Tensor(np.arange(usable, slots, dtype=np.int32)),
                  ms.Tensor(np.array([5], np.int32)), ms.Tensor(np.zeros((slots, 1), np.float32)), usable)
        # Inference covers the whole graph before kernel selection stops at the first Ascend-only op.
        assert unsupported_on_cpu(ParallelRowStep(step, 1), *inputs) in {"RmsNorm", "FlashAttentionScore"}
