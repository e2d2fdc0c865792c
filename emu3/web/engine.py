"""The model work behind the web demo, without gradio: streamed text-to-image and streamed answers.

Every piece of MindSpore work runs on one worker thread, the engine's: MindSpore's PYNATIVE runtime
crashes (segfault) when two threads run ops at once, e.g. a preview decoded by the web server's
thread while the worker generates. Jobs wait in the worker's queue, so two browser tabs take turns
instead of sharing a KV cache. A job's updates (a picture that fills in row by row with the speed
and the time left; an answer that grows) reach the caller through a queue as they come, and a job
stops between two chunks of tokens when its stop event is set.

Bad input (no prompt, a ratio that makes no image, an upload that is not a picture, a prompt that
does not fit the context window) raises ValueError with a sentence for the page, before any
model work starts.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from emu3.cli.generate_image import NEGATIVE_PROMPT, POSITIVE_SUFFIX, slug
from emu3.cli.outputs import save_image
from emu3.generation.generate import GenerationConfig, generate
from emu3.mllm.processor import image_tokens_to_generate
from emu3.tokenizer.image_processor import open_image

logger = logging.getLogger("emu3")

# Partial pictures are decoded about this many times per image (decoding costs a VQ decoder pass).
PREVIEWS_PER_IMAGE = 8
BACKGROUND = (128, 128, 128)


@dataclass
class ImageUpdate:
    image: Image.Image | None
    status: str
    path: Path | None = None


@dataclass
class AnswerUpdate:
    text: str
    status: str


class Engine:
    """The language model(s), the processor, and the worker thread that runs jobs on them in turn."""

    def __init__(self, model, processor, chat_model=None, output_dir="outputs/web_demo", image_area=None,
                 chat_max_new_tokens: int = 320):
        self.model = model
        self.chat_model = chat_model or model
        self.processor = processor
        self.output_dir = Path(output_dir)
        self.image_area = image_area or model.config.image_area
        self.chat_max_new_tokens = chat_max_new_tokens
        self._jobs = queue.Queue()
        threading.Thread(target=self._work, name="emu3-models", daemon=True).start()

    def text_to_image(self, prompt: str, ratio: str = "1:1", guidance_scale: float = 3.0, seed: int = 42,
                      top_k: int = 2048, top_p: float = 1.0, temperature: float = 1.0, greedy: bool = False,
                      negative_prompt: str = NEGATIVE_PROMPT, stop: threading.Event | None = None):
        """Yields ImageUpdates: partial pictures while generating, then the finished one with its PNG."""
        return self._submit(self._text_to_image, stop, prompt, ratio, guidance_scale, seed, top_k, top_p,
                            temperature, greedy, negative_prompt)

    def answer(self, image_path, question: str, max_new_tokens: int | None = None,
               stop: threading.Event | None = None):
        """Yields AnswerUpdates with the answer so far."""
        return self._submit(self._answer, stop, image_path, question, max_new_tokens)

    # ---- the worker ------------------------------------------------------------------------
    def _submit(self, job, stop, *args):
        """Queue job(emit, stop, *args) for the worker; yield what it emits; raise what it raises."""
        updates = queue.Queue()
        self._jobs.put((job, updates, stop or threading.Event(), args))
        while True:
            kind, value = updates.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value

    def _work(self):
        while True:
            job, updates, stop, args = self._jobs.get()
            try:
                job(lambda update: updates.put(("update", update)), stop, *args)
                updates.put(("end", None))
            except BaseException as err:  # handed to the caller, which reports it
                updates.put(("error", err))

    # ---- text to image ---------------------------------------------------------------------
    def _text_to_image(self, emit, stop, prompt, ratio, guidance_scale, seed, top_k, top_p, temperature, greedy,
                       negative_prompt):
        prompt = (prompt or "").strip()
        ratio = (ratio or "").strip()
        if not prompt:
            raise ValueError("Type a prompt first.")
        if guidance_scale is None or guidance_scale < 1:
            raise ValueError(f"Guidance scale must be at least 1 (1 turns guidance off), got {guidance_scale}.")
        processor = self.processor
        inputs = processor(prompt + POSITIVE_SUFFIX, mode="G", ratio=ratio, image_area=self.image_area)
        h, w = (int(v) for v in inputs["image_size"][0])
        guided = guidance_scale != 1
        negative = processor(negative_prompt or "", mode="G", ratio=ratio, image_area=self.image_area) \
            if guided else None
        config = GenerationConfig(
            max_new_tokens=image_tokens_to_generate(h, w), do_sample=not greedy, top_k=int(top_k or 0),
            top_p=float(top_p), temperature=float(temperature), seed=int(seed if seed is not None else 42),
            guidance_scale=guidance_scale if guided else None)
        config.validate()
        total, f = config.max_new_tokens, processor.spatial_factor
        header = f"{w * f}x{h * f} pixels ({h}x{w} tokens)"
        canvas = Image.new("RGB", (w * f, h * f), BACKGROUND)
        shown = [0]  # rows on the canvas
        every = max(1, h // PREVIEWS_PER_IMAGE)
        start = time.perf_counter()

        def show(new_ids, rows):
            if rows > shown[0]:
                canvas.paste(processor.decode_image(self._grid(new_ids, rows, w)), (0, 0))
                shown[0] = rows

        def progress(new_ids):
            done, seconds = new_ids.shape[1], time.perf_counter() - start
            rows = min(h, done // (w + 1))
            rate = done / seconds
            status = (f"Generating {header}: row {rows}/{h}, {done}/{total} tokens, {rate:.1f} tokens/s, "
                      f"{(total - done) / rate:.0f} s left")
            if rows >= shown[0] + every or rows == h:
                show(new_ids[0], rows)
                emit(ImageUpdate(canvas.copy(), status))
            else:
                emit(ImageUpdate(None, status))
            return stop.is_set()

        emit(ImageUpdate(None, f"Generating {header}: {total} tokens…"))
        ids = generate(self.model, inputs["input_ids"], inputs["attention_mask"], config,
                       negative_input_ids=None if negative is None else negative["input_ids"],
                       negative_attention_mask=None if negative is None else negative["attention_mask"],
                       image_size=(h, w), progress=False, callback=progress)
        seconds = time.perf_counter() - start
        new = ids[0, inputs["input_ids"].shape[1]:]
        if new.shape[0] < total:
            rows = min(h, new.shape[0] // (w + 1))
            show(new, rows)
            emit(ImageUpdate(canvas.copy(), f"Stopped after {rows} of {h} rows ({seconds:.1f} s)."))
            return
        image = next(part for part in processor.decode(ids[0]) if isinstance(part, Image.Image))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}_{slug(prompt)}.png"
        save_image(image, path)
        emit(ImageUpdate(image, f"Done: {header} in {seconds:.1f} s ({total / seconds:.1f} tokens/s).", path))

    def _grid(self, new_ids: np.ndarray, rows: int, width: int) -> np.ndarray:
        """The codes of the first `rows` complete rows (each w visual tokens and an eol)."""
        grid = np.asarray(new_ids[:rows * (width + 1)]).reshape(rows, width + 1)[:, :width]
        return grid - self.processor.tokenizer.visual_token_id(0)

    # ---- chat ------------------------------------------------------------------------------
    @staticmethod
    def open_image(path) -> Image.Image:
        """The uploaded picture as RGB, converted as the commands convert it (16-bit scaled, ...),
        or a ValueError saying it is not one."""
        try:
            return open_image(path)
        except ValueError as err:
            raise ValueError(f"The upload is not a picture this demo can read (PNG, JPEG, WebP, ...): {err}") from None

    def _answer(self, emit, stop, image_path, question, max_new_tokens):
        if not image_path:
            raise ValueError("Upload an image first.")
        question = (question or "").strip()
        if not question:
            raise ValueError("Type a question first.")
        image = self.open_image(image_path)
        emit(AnswerUpdate("", "Reading the image…"))
        start = time.perf_counter()
        inputs = self.processor(question, image=image, mode="U")
        tok = self.processor.tokenizer
        new = int(max_new_tokens or self.chat_max_new_tokens)
        prompt_length = inputs["input_ids"].shape[1]
        context = self.chat_model.config.max_position_embeddings
        if prompt_length + new > context:
            raise ValueError(f"The image and question take {prompt_length} tokens; with a {new}-token answer that "
                             f"passes the model's context window of {context}: use a smaller picture.")
        config = GenerationConfig(max_new_tokens=new, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

        def text(ids):
            ids = ids.tolist()
            return tok.decode(ids[:ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids,
                              skip_special_tokens=True)

        def progress(new_ids):
            seconds = time.perf_counter() - start
            emit(AnswerUpdate(text(new_ids[0]), f"{new_ids.shape[1]} tokens, {new_ids.shape[1] / seconds:.1f} tokens/s"))
            return stop.is_set()

        ids = generate(self.chat_model, inputs["input_ids"], inputs["attention_mask"], config, progress=False,
                       callback=progress)
        tokens = ids.shape[1] - prompt_length
        stopped = " (stopped)" if stop.is_set() else ""
        emit(AnswerUpdate(text(ids[0, prompt_length:]),
                          f"Done{stopped}: {tokens} tokens in {time.perf_counter() - start:.1f} s."))
