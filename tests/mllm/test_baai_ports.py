"""BAAI's image_generation.py and multimodal_understanding.py, ported with only their imports and
device/dtype constants changed (examples/baai_*.py), run on the demo checkpoints and compared with
our command-line scripts under greedy decoding.

The hub ids of BAAI's scripts ("BAAI/Emu3-Gen", ...) are found in a Hugging Face cache laid out here
around the demo checkpoints, as `huggingface-cli download` lays it out.
"""

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emu3 import backend, demo
from emu3.cli import generate_image, vqa
from emu3.transformers_compat import resolve_pretrained

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("ports")
    saved = {k: os.environ.get(k) for k in ("EMU3_DEMO_DIR", "HF_HUB_CACHE")}
    os.environ["EMU3_DEMO_DIR"] = str(root / "demo")
    os.environ["HF_HUB_CACHE"] = str(root / "hub")
    # Built in PYNATIVE mode: a module fixture runs before conftest's per-test mode, and building the
    # demo in MindSpore's default GRAPH mode made every later generation of this process 4-7x slower
    # (measured: 1.4 against 9.7 tokens/s).
    backend.set_run_mode("pynative", "CPU")
    llm_dir, vq_dir = demo.demo_checkpoints()
    for repo, target in (("Emu3-Gen", llm_dir), ("Emu3-Chat", llm_dir), ("Emu3-VisionTokenizer", vq_dir)):
        cached = root / "hub" / f"models--BAAI--{repo}"
        (cached / "snapshots").mkdir(parents=True)
        (cached / "snapshots" / "0123abc").symlink_to(target)
        (cached / "refs").mkdir()
        (cached / "refs" / "main").write_text("0123abc")
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_port(name: str, cwd: Path, replace: tuple = ()) -> tuple[dict, str]:
    """Execute examples/NAME in `cwd` as a script; returns its globals and what it printed."""
    source = (ROOT / "examples" / name).read_text()
    for old, new in replace:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    namespace = {"__name__": "__main__"}
    printed = io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(source, name, "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace, printed.getvalue()


def test_hub_ids_resolve_from_the_cache_only(hub, tmp_path):
    assert resolve_pretrained("BAAI/Emu3-Gen").resolve() == demo.demo_checkpoints()[0].resolve()
    with pytest.raises(FileNotFoundError, match="huggingface-cli download BAAI/Emu3-Stage1"):
        resolve_pretrained("BAAI/Emu3-Stage1")
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        resolve_pretrained(str(tmp_path / "missing"))


def test_baai_image_generation_port_equals_our_script(hub, tmp_path):
    """Greedy (BAAI samples; the comparison needs determinism): two prompts, two ratios, one batch.
    The test's only change to the port is that line."""
    namespace, _ = run_port("baai_image_generation.py", tmp_path, replace=(("do_sample=True,", "do_sample=False,"),))
    outputs = namespace["outputs"].asnumpy()
    for i, (prompt, ratio) in enumerate(zip(["a portrait of young girl.", "a shiba inu"], ["1:1", "16:9"])):
        [port_png] = sorted(tmp_path.glob(f"result_{i}_*.png"))
        [ours] = generate_image.main(["--prompt", prompt, "--ratio", ratio, "--greedy",
                                      "--output-dir", str(tmp_path / f"ours{i}")])
        port_image, our_image = np.asarray(Image.open(port_png)), np.asarray(Image.open(ours))
        h, w = namespace["pos_inputs"].image_size.asnumpy()[i]
        assert port_image.shape == (8 * h, 8 * w, 3)
        np.testing.assert_array_equal(port_image, our_image)
        # The prompt, then exactly the image's tokens, eos, and padding for the shorter image.
        new = outputs[i, namespace["pos_inputs"].input_ids.shape[1]:].tolist()
        assert new[(w + 1) * h + 2] == namespace["model"].config.eos_token_id


def test_baai_multimodal_understanding_port_equals_our_script(hub, tmp_path):
    (tmp_path / "assets").mkdir()
    vqa.demo_image(tmp_path / "assets" / "demo.png")
    # 32 new tokens instead of BAAI's 320 (random weights never say eos): the same code, a tenth of the time.
    namespace, printed = run_port("baai_multimodal_understanding.py", tmp_path,
                                  replace=(("max_new_tokens=320,", "max_new_tokens=32,"),))
    [record] = vqa.main(["--image", str(tmp_path / "assets" / "demo.png"), "--question", "Please describe the image",
                         "--max-new-tokens", "32", "--output", str(tmp_path / "answers.jsonl")])
    assert printed == record["answer"] + "\n"
    assert namespace["outputs"].shape[1] == 32


def test_loaders_refuse_what_this_port_cannot_do(hub):
    from emu3.transformers_compat import AutoModel, AutoModelForCausalLM, AutoTokenizer

    with pytest.raises(ValueError, match="CUDA is not supported"):
        AutoModelForCausalLM.from_pretrained("BAAI/Emu3-Gen", device_map="cuda:0")
    with pytest.raises(ValueError, match="MindSpore runs on CPU"):
        AutoModelForCausalLM.from_pretrained("BAAI/Emu3-Gen", device_map="npu:0")
    with pytest.raises(ValueError, match="torch_dtype must be"):
        AutoModelForCausalLM.from_pretrained("BAAI/Emu3-Gen", torch_dtype="int8")
    with pytest.raises(ValueError, match="bf16 matmul/conv have no CPU kernel"):
        AutoModelForCausalLM.from_pretrained("BAAI/Emu3-Gen", torch_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['revision'\]"):
        AutoTokenizer.from_pretrained("BAAI/Emu3-Gen", revision="main")
    with pytest.raises(ValueError, match="load the language model with AutoModelForCausalLM"):
        AutoModel.from_pretrained("BAAI/Emu3-Gen")
    assert AutoTokenizer.from_pretrained("BAAI/Emu3-Gen", trust_remote_code=True).padding_side == "left"
