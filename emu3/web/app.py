"""The web demo: text-to-image and chat about an image in the browser (gradio), on BAAI's weights or
the tiny random demo checkpoints.

    bash scripts/web_demo.sh                                   # demo checkpoints (random weights)
    bash scripts/web_demo.sh --model Emu3-Gen --vq Emu3-VisionTokenizer --chat-model Emu3-Chat

It prints the URL to open. Text to image: the picture fills in while it is generated (the rows so
far are decoded every few rows), with the speed and the time left; Stop ends the job at the next
chunk; the finished PNG can be downloaded (it is also kept in --output-dir). Chat: upload a picture,
ask, the answer streams. Bad input shows a sentence on the page; jobs from several browser tabs
queue, one at a time. Needs the demo extra: `pip install -r requirements-demo.txt`.
"""

import logging
import sys
import threading
from pathlib import Path

from emu3 import backend
from emu3.cli import options
from emu3.cli.errors import command
from emu3.cli.generate_image import NEGATIVE_PROMPT
from emu3.cli.loading import add_model_arguments, check_model_arguments, load
from emu3.cli.outputs import check_directory
from emu3.mllm.model import Emu3ForCausalLM
from emu3.web.engine import Engine

logger = logging.getLogger("emu3")

# Random weights never say eos: keep the demo's answers short.
DEMO_CHAT_TOKENS = 16
# The demo's pictures are a few dozen pixels: show them large and sharp, not blurred.
CSS = "#t2i-image img, #chat-preview img {image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;}"
INSTALL_HINT = "the web demo needs gradio: pip install -r requirements-demo.txt (or pip install '.[demo]')"


def parse_args(argv=None):
    p = options.ArgumentParser(prog="web_demo.sh", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=options.integer(low=1, high=65535), default=7860, help="port (default 7860)")
    p.add_argument("--chat-model", help="Emu3-Chat directory for the chat tab (default: the --model weights)")
    p.add_argument("--output-dir", default="outputs/web_demo", help="where finished PNGs are kept")
    p.add_argument("--image-area", type=options.integer(low=1),
                   help="pixels per generated image (default: the model's image_area)")
    p.add_argument("--max-new-tokens", type=options.integer(low=1),
                   help=f"longest chat answer (default 320; {DEMO_CHAT_TOKENS} with the demo weights)")
    add_model_arguments(p, "BAAI Emu3-Gen directory for text-to-image")
    return p.parse_args(argv)


def _failure(err: Exception) -> str:
    """The sentence the page shows for a failed job: the message of bad input, a pointer for bugs."""
    if isinstance(err, ValueError):
        return f"⚠️ {err}"
    logger.exception("web demo job failed")
    return f"⚠️ Something went wrong on the server ({type(err).__name__}: {err}); the details are in its log."


def build_app(engine: Engine, is_demo: bool):
    import gradio as gr

    stops: dict[str, threading.Event] = {}

    def new_stop(request: gr.Request) -> threading.Event:
        stops[request.session_hash] = threading.Event()
        return stops[request.session_hash]

    def stop_job(request: gr.Request):
        if request.session_hash in stops:
            stops[request.session_hash].set()

    def text_to_image(prompt, ratio, guidance, seed, top_k, top_p, temperature, greedy, negative,
                      request: gr.Request):
        image, path = None, None
        try:
            for update in engine.text_to_image(prompt, ratio, guidance, seed, top_k, top_p, temperature, greedy,
                                               negative, stop=new_stop(request)):
                image = update.image or image
                path = update.path
                yield image, update.status, None if path is None else str(path)
        except Exception as err:  # every failure becomes a sentence on the page
            yield image, _failure(err), None

    def open_upload(path):
        if not path:
            return None, ""
        try:
            return engine.open_image(path), ""
        except ValueError as err:
            return None, _failure(err)

    def answer(image_path, question, request: gr.Request):
        text = ""
        try:
            for update in engine.answer(image_path, question, stop=new_stop(request)):
                text = update.text
                yield text, update.status
        except Exception as err:
            yield text, _failure(err)

    banner = ("**Random demo weights:** the pictures are noise and the answers gibberish; every stage of the "
              "pipeline runs. Start with `--model/--vq` for BAAI's weights." if is_demo else "")
    with gr.Blocks(title="Emu3 on MindSpore") as app:
        gr.Markdown("# Emu3 on MindSpore\nNext-token prediction for images and text. " + banner)
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a portrait of young girl.",
                                        elem_id="t2i-prompt")
                    ratio = gr.Textbox("1:1", label="Ratio (width:height)", elem_id="t2i-ratio")
                    guidance = gr.Slider(1, 10, 3.0, step=0.5, label="Guidance scale (1: off)")
                    seed = gr.Number(42, precision=0, label="Seed")
                    with gr.Accordion("Sampling", open=False):
                        greedy = gr.Checkbox(False, label="Greedy: always the likeliest token")
                        top_k = gr.Number(2048, precision=0, label="Top-k (0: all)")
                        top_p = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="Top-p")
                        temperature = gr.Slider(0.1, 2.0, 1.0, step=0.05, label="Temperature")
                        negative = gr.Textbox(NEGATIVE_PROMPT, label="Negative prompt", lines=2)
                    with gr.Row():
                        generate_button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                        stop_button = gr.Button("Stop", elem_id="t2i-stop")
                with gr.Column():
                    picture = gr.Image(label="Picture", type="pil", format="png", interactive=False, height=420,
                                       elem_id="t2i-image")
                    status = gr.Markdown(elem_id="t2i-status")
                    download = gr.File(label="Finished PNG", elem_id="t2i-file")
        with gr.Tab("Chat about an image"):
            with gr.Row():
                with gr.Column():
                    # A file box, not an image box: gradio's image box rejects a non-image upload with a
                    # bare "Error"; here the upload reaches open_upload, which says what is wrong.
                    upload = gr.File(label="Picture file (PNG, JPEG, ...)", type="filepath", elem_id="chat-file")
                    preview = gr.Image(label="Picture", type="pil", interactive=False, height=240,
                                       elem_id="chat-preview")
                    question = gr.Textbox("Please describe the image", label="Question", elem_id="chat-question")
                    with gr.Row():
                        ask_button = gr.Button("Ask", variant="primary", elem_id="chat-ask")
                        stop_chat = gr.Button("Stop", elem_id="chat-stop")
                with gr.Column():
                    reply = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="chat-answer")
                    chat_status = gr.Markdown(elem_id="chat-status")
        # One job at a time on the models, whichever tab or browser asked: the others wait in line.
        generate_button.click(text_to_image, [prompt, ratio, guidance, seed, top_k, top_p, temperature, greedy,
                                              negative], [picture, status, download],
                              concurrency_id="models", concurrency_limit=1)
        upload.change(open_upload, upload, [preview, chat_status])
        ask_button.click(answer, [upload, question], [reply, chat_status], concurrency_id="models",
                         concurrency_limit=1)
        # Stops are not queued behind the job they stop.
        for button in (stop_button, stop_chat):
            button.click(stop_job, None, None, concurrency_limit=None, queue=False)
    return app


def _chat_model(args, model):
    if args.chat_model is None:
        return model
    if not Path(args.chat_model).is_dir():
        raise ValueError(f"--chat-model {args.chat_model} is not a directory")
    dtype = args.dtype or backend.default_dtype()
    attn = args.attn_implementation or backend.default_attn_implementation()
    # Fused projections, as the inference commands load their models (emu3.cli.loading).
    model = Emu3ForCausalLM.from_pretrained(args.chat_model, dtype=dtype, attn_implementation=attn)
    return model.fuse_projections().eval()


@command
def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    check_model_arguments(args)
    if args.chat_model is not None and args.model is None:
        raise ValueError("--chat-model goes with --model and --vq (BAAI's weights)")
    try:
        import gradio as gr
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    check_directory(args.output_dir, "--output-dir")
    model, processor, is_demo = load(args)
    engine = Engine(model, processor, _chat_model(args, model), args.output_dir, args.image_area,
                    args.max_new_tokens or (DEMO_CHAT_TOKENS if is_demo else 320))
    app = build_app(engine, is_demo)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                           ssr_mode=False, theme=theme, allowed_paths=[str(Path(args.output_dir).resolve())],
                           footer_links=[], css=CSS)
    print(f"Emu3 web demo running at {url} (Ctrl-C stops it)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
