"""The inference scripts end to end on the demo checkpoints, checked against a naive recomputation.

The scripts run as a user runs them (bash, a fresh process, no weights given). Their outputs are
compared with what the rules give when recomputed here the slow, obvious way: a full forward of
the whole sequence for every new token (no KV cache, no batching), classifier-free guidance and
the image constraint written out in numpy, greedy choice.
"""

import json
import os
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from emu3 import demo
from emu3.cli import generate_image
from emu3.cli.generate_image import NEGATIVE_PROMPT, POSITIVE_SUFFIX
from emu3.mllm.model import Emu3ForCausalLM
from emu3.mllm.processor import Emu3Processor
from emu3.mllm.tokenizer import Emu3Tokenizer
from emu3.tokenizer import Emu3VisionVQImageProcessor, Emu3VisionVQModel
from tests.mllm.tokenizer_files import qwen_vocab_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_cache")
    old = os.environ.get("EMU3_DEMO_DIR")
    os.environ["EMU3_DEMO_DIR"] = str(root)
    demo.demo_checkpoints()
    yield root
    if old is None:
        os.environ.pop("EMU3_DEMO_DIR")
    else:
        os.environ["EMU3_DEMO_DIR"] = old


@pytest.fixture(scope="module")
def pipeline(demo_dir):
    llm_dir, vq_dir = demo.demo_checkpoints()
    model = Emu3ForCausalLM.from_pretrained(llm_dir)
    model.set_train(False)
    vq = Emu3VisionVQModel.from_pretrained(vq_dir)
    vq.set_train(False)
    processor = Emu3Processor(Emu3VisionVQImageProcessor.from_pretrained(vq_dir), vq,
                              Emu3Tokenizer.from_pretrained(llm_dir))
    return model, processor


def run_script(name, *args, cwd):
    env = {**os.environ, "GLOG_v": "3"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / name), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def last_log_probs(model, ids):
    logits = model(ms.Tensor(np.array([ids], dtype=np.int32))).asnumpy()[0, -1].astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def allowed_next(offset, h, w, tok):
    if offset % (w + 1) == 0:
        return [tok.eol_token_id]
    special = {(w + 1) * h + 1: tok.eof_token_id, (w + 1) * h + 2: tok.eoi_token_id,
               (w + 1) * h + 3: tok.eos_token_id}
    if offset in special:
        return [special[offset]]
    return list(range(tok.visual_token_id(0), tok.visual_token_id(tok.codebook_size - 1) + 1))


def test_demo_checkpoints_are_in_baai_layout(demo_dir):
    llm_dir, vq_dir = demo.demo_checkpoints()
    assert sorted(p.name for p in llm_dir.iterdir()) == [
        "config.json", "emu3.tiktoken", "emu3_vision_tokens.txt", "model.safetensors", "tokenizer_config.json"]
    assert sorted(p.name for p in vq_dir.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert (llm_dir / "emu3.tiktoken").read_bytes() == qwen_vocab_file().read_bytes()
    config = json.loads((llm_dir / "config.json").read_text())
    assert config["vocab_size"] == 184622 and config["image_area"] == demo.DEMO_LLM_CONFIG["image_area"]
    lines = (llm_dir / "emu3_vision_tokens.txt").read_text().splitlines()
    assert lines[:4] == ["<|image token|>", "<|image start|>", "<|image end|>", "<|visual token 000000|>"]
    assert len(lines) == 3 + 32768
    header = json.loads((llm_dir / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (llm_dir / "model.safetensors").read_bytes()[:8], "little")])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.1.self_attn.q_proj.weight"} <= set(header)
    # Built once: a second call reuses the cache.
    stamp = (llm_dir / "model.safetensors").stat().st_mtime_ns
    assert demo.demo_checkpoints() == (llm_dir, vq_dir)
    assert (llm_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in demo_dir.iterdir()] == [demo.DEMO_VERSION]


def test_interrupted_build_leaves_no_cache_and_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU3_DEMO_DIR", str(tmp_path))
    monkeypatch.setattr(demo, "write_demo_llm", lambda d: (d.mkdir(parents=True), (d / "config.json").write_text("{}")))

    def interrupted(directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "write_demo_vq", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.demo_checkpoints()
    assert list(tmp_path.iterdir()) == []

    # A cache someone emptied by hand is rebuilt, not trusted.
    monkeypatch.setattr(demo, "write_demo_vq", lambda d: d.mkdir(parents=True))
    (tmp_path / demo.DEMO_VERSION / demo.LLM_DIR).mkdir(parents=True)
    llm_dir, vq_dir = demo.demo_checkpoints()
    assert (llm_dir / "config.json").is_file() and vq_dir.is_dir()


def test_infer_img_gen_script_on_demo(demo_dir, pipeline, tmp_path):
    from transformers.models.emu3.processing_emu3 import Emu3Processor as Reference

    model, processor = pipeline
    tok = processor.tokenizer
    prompts, scale, ratio, area = ["a red apple on a table", "fog"], 3.0, "2:1", 512
    result = run_script("infer_img_gen.sh", "--prompt", prompts[0], "--prompt", prompts[1], "--ratio", ratio,
                        "--image-area", str(area), "--greedy", "--guidance-scale", str(scale), "--batch-size", "2",
                        "--output-dir", "out", cwd=tmp_path)
    assert "RANDOM" in result.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["000_a_red_apple_on_a_table.png", "001_fog.png"]
    meta = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert meta["finished"] and meta["files"] == [f.name for f in files]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f.name for f in files] + ["generation.json"]
    h, w = meta["tokens"]
    assert (h, w) == Reference.calculate_generate_size(None, ratio, area, 8) == (2, 4)

    # Each prompt alone, recomputed naively: CFG on full forwards, the constraint, greedy. The
    # script ran both prompts as one left-padded batch.
    uncond_prompt = processor(NEGATIVE_PROMPT, mode="G", ratio=ratio, image_area=area)["input_ids"][0].tolist()
    for prompt, path in zip(prompts, files):
        cond = processor(prompt + POSITIVE_SUFFIX, mode="G", ratio=ratio, image_area=area)["input_ids"][0].tolist()
        uncond = list(uncond_prompt)
        for offset in range(1, (w + 1) * h + 4):
            c, u = last_log_probs(model, cond), last_log_probs(model, uncond)
            scores = scale * (c - u) + u
            allowed = allowed_next(offset, h, w, tok)
            token = allowed[int(np.argmax(scores[allowed]))]
            cond.append(token)
            uncond.append(token)
        assert cond[-1] == tok.eos_token_id
        expected = processor.decode(cond)[1]
        produced = Image.open(path)
        assert produced.size == expected.size == (8 * w, 8 * h)
        assert np.abs(np.asarray(produced, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_infer_img_gen_with_parallel_rows_records_its_passes(demo_dir, tmp_path, monkeypatch, capsys):
    """--parallel-window: the demo's 8x8-token image in (8-1)*2 + 8 = 22 passes instead of 75; the
    progress bar counts the 75 tokens, the summary and generation.json the passes."""
    monkeypatch.chdir(tmp_path)
    written = generate_image.main(["--parallel-window", "2", "--prompt", "fog", "--output-dir", "out"])
    assert [p.name for p in written] == ["000_fog.png"] and Image.open(written[0]).size == (64, 64)
    meta = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert meta["tokens"] == [8, 8] and meta["parallel_window"] == 2 and meta["forward_passes"] == 22
    err = capsys.readouterr().err
    assert "75/75" in err and "22 forward passes (rows in parallel, window 2; sequential decoding: 75)" in err


def test_infer_vqa_script_on_demo(demo_dir, pipeline, tmp_path):
    model, processor = pipeline
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate([(80, 64), (48, 96)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    questions = ["What is in the picture?", "Which colour dominates?"]
    steps = 3
    args = ["--max-new-tokens", str(steps), "--output", "answers.jsonl"]
    for path, question in zip(paths, questions):
        args += ["--image", path.name, "--question", question]
    result = run_script("infer_vqa.sh", *args, cwd=tmp_path)
    assert "RANDOM" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "img0.png", "img1.png"]  # no lock left
    assert [(r["image"], r["question"]) for r in records] == [(p.name, q) for p, q in zip(paths, questions)]

    # Each pair alone, unpadded, greedy on full forwards: batching and padding must not matter.
    for path, question, record in zip(paths, questions, records):
        ids = processor(question, image=Image.open(path).convert("RGB"), mode="U")["input_ids"][0].tolist()
        answer = []
        for _ in range(steps):
            token = int(np.argmax(last_log_probs(model, ids + answer)))
            if token == tok.eos_token_id:
                break
            answer.append(token)
        assert record["answer"] == tok.decode(answer, skip_special_tokens=True)
        assert record["answer"] in result.stdout
