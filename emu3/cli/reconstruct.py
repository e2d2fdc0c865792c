"""Reconstruct an image or a video through the vision tokenizer and report PSNR.

    python -m emu3.cli.reconstruct INPUT --weights DIR [--mode graph] [--dtype fp16] [--output-dir out]

INPUT is an image file, a folder of video frames (sorted by name), or a video file (GIF; MP4 and
other formats through OpenCV). The input is resized by the image processor (smart_resize to a
multiple of 8 pixels per side), encoded to codes, decoded, and written next to the resized input
as PNG (video: PNG frames plus a GIF). PSNR is measured against the resized input, in 8-bit RGB.
A video whose frame count is not a multiple of 4 is padded by repeating its last frame; the
padding is dropped from the outputs and from the PSNR.
"""

import math
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image, ImageSequence

from emu3 import backend
from emu3.cli import options
from emu3.cli.errors import command
from emu3.cli.outputs import check_directory, locked, refuse_directories, save_image
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQImageProcessor, Emu3VisionVQModel
from emu3.tokenizer.image_processor import PREPROCESSOR_FILE, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# The largest --image-area taken (16 times the processor's default maximum of 1024x1024): a typo
# such as 10**12 fails here instead of trying to allocate terabytes.
MAX_IMAGE_AREA = 4096 * 4096
RANDOM_BANNER = """
##########################################################################
#  --random-weights: a tiny RANDOMLY INITIALISED tokenizer.              #
#  It shows the pipeline running; its reconstructions are NOISE and the  #
#  PSNR below means nothing. Pass --weights <Emu3-VisionTokenizer dir>.  #
##########################################################################
"""


def parse_args(argv=None):
    parser = options.ArgumentParser(prog="python -m emu3.cli.reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="image file, folder of video frames, or video file (.gif, .mp4, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="tokenizer directory: BAAI's Emu3-VisionTokenizer layout or "
                                          "transformers' Emu3 -hf layout")
    source.add_argument("--random-weights", action="store_true",
                        help="use a tiny randomly initialised tokenizer (pipeline check only, output is noise)")
    parser.add_argument("--mode", choices=sorted(backend.MODES), default="pynative",
                        help="MindSpore execution mode (default pynative)")
    parser.add_argument("--dtype", choices=sorted(backend.DTYPES), default="fp32",
                        help="convolution dtype (default fp32; bf16 needs Ascend); norms stay fp32")
    parser.add_argument("--device", choices=["CPU", "Ascend"], help="device (default: MindSpore's own choice)")
    parser.add_argument("--output-dir", default="outputs/reconstruct", help="where to write (default %(default)s)")
    parser.add_argument("--image-area", type=options.integer(low=64, high=MAX_IMAGE_AREA),
                        help="resize to about this many pixels (sets the processor's min and max pixels); "
                             "default: the processor's range, 512*512 to 1024*1024")
    return parser.parse_args(argv)


def load_frames(path: Path) -> tuple[list[Image.Image], bool, float]:
    """(frames, is_video, seconds per frame) from an image, a folder of frames, or a video file;
    every frame decoded in full and in RGB, so that an unreadable one fails before the model loads."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [open_image(f) for f in files], True, 0.1
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [open_image(path)], False, 0.0
    if path.suffix.lower() == ".gif":
        try:
            with Image.open(path) as gif:
                duration = gif.info.get("duration", 100) / 1000
                return [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)], True, duration
        except OSError as err:  # truncated or not a GIF
            raise ValueError(f"{path} cannot be read as a GIF: {err}") from None
    return _read_video(path)


def _read_video(path: Path):
    try:
        import cv2
    except ImportError:
        raise ValueError(f"reading {path.suffix} videos needs OpenCV (pip install opencv-python); "
                         "GIFs and folders of frames work without it") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open {path} as a video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    capture.release()
    if not frames:
        raise ValueError(f"no frames could be read from {path}")
    return frames, True, 1.0 / fps


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def build_processor(args) -> Emu3VisionVQImageProcessor:
    if args.random_weights or not (Path(args.weights) / PREPROCESSOR_FILE).is_file():
        if not args.random_weights:
            print(f"note: {args.weights} has no {PREPROCESSOR_FILE}; using BAAI's default preprocessing",
                  file=sys.stderr)
        processor = Emu3VisionVQImageProcessor()
    else:
        processor = Emu3VisionVQImageProcessor.from_pretrained(args.weights)
    if args.image_area is not None:
        processor.min_pixels = processor.max_pixels = args.image_area
    return processor


def build_model(args) -> Emu3VisionVQModel:
    if args.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
        ms.set_seed(0)
        return Emu3VisionVQModel(Emu3VisionVQConfig(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1), dtype=args.dtype)
    return Emu3VisionVQModel.from_pretrained(args.weights, dtype=args.dtype)


@command
def main(argv=None) -> float:
    args = parse_args(argv)
    if args.weights is not None:
        Emu3VisionVQConfig.from_pretrained(args.weights)  # a wrong directory or config fails now, in a moment
    frames, is_video, seconds_per_frame = load_frames(Path(args.input))
    processor = build_processor(args)
    # Every frame must resize (a clear error for a tiny or elongated one) and the outputs must fit,
    # before the model loads.
    sizes = {processor.smart_resize(frame.height, frame.width) for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of {args.input} resize to different sizes {sorted(sizes)}: a video's frames "
                         "must share one size")
    ((height, width),) = sizes
    out = Path(args.output_dir)
    stem = Path(args.input).stem
    suffixes = [f"_{i:04d}" for i in range(len(frames))] if is_video else [""]
    inputs = [out / f"{stem}_input{suffix}.png" for suffix in suffixes]
    recons = [out / f"{stem}_recon{suffix}.png" for suffix in suffixes]
    gif = out / f"{stem}_recon.gif"
    check_directory(out, "--output-dir", needed_bytes=(2 * 3 + is_video) * height * width * len(frames))
    refuse_directories(inputs + recons + [gif] * is_video)
    with locked(out, "--output-dir"):
        backend.set_run_mode(args.mode, args.device)
        model = build_model(args)
        return _reconstruct(args, model, processor, frames, is_video, seconds_per_frame, inputs, recons, gif)


def _reconstruct(args, model, processor, frames, is_video, seconds_per_frame, inputs, recons, gif) -> float:
    pixels = processor(frames, return_tensors="np")["pixel_values"]
    reference = np.stack([np.asarray(processor.resize(frame)) for frame in frames])
    count = len(frames)
    if is_video:
        factor = model.config.temporal_downsample_factor
        padded = max(factor, -(-count // factor) * factor)
        if padded != count:
            print(f"note: {count} frames padded to {padded} by repeating the last (the tokenizer takes multiples "
                  f"of {factor}); the padding is dropped from the outputs", file=sys.stderr)
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padded - count, axis=0)])
        pixels = pixels[None]

    start = time.perf_counter()
    codes = model.encode(ms.Tensor(pixels))
    recon = model.decode(codes).asnumpy()
    elapsed = time.perf_counter() - start
    recon = recon[0, :count] if is_video else recon
    images = processor.postprocess(recon)["pixel_values"]

    for ref, img, input_path, recon_path in zip(reference, images, inputs, recons):
        save_image(Image.fromarray(ref), input_path)
        save_image(img, recon_path)
    written = list(recons)
    if is_video:
        save_image(images[0], gif, save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(seconds_per_frame * 1000)))
        written.append(gif)

    score = psnr(reference, np.stack([np.asarray(img) for img in images]))
    height, width = pixels.shape[-2:]
    print(f"input: {args.input} ({count} frame{'s' * (count > 1)}, resized to {width}x{height})")
    print(f"codes: {tuple(codes.shape)}  encode+decode: {elapsed:.2f} s  ({args.mode}, {args.dtype})")
    print(f"wrote: {written[0]}" + (f" ... {written[-1]} ({len(written)} files)" if len(written) > 1 else ""))
    print(f"PSNR: {score:.2f} dB")
    return score


if __name__ == "__main__":
    main()
