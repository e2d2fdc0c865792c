"""How far the vision tokenizer with fp16 Conv3d (what an Ascend NPU computes) drifts from all-fp32.

    python -m emu3.cli.vq_conv3d_drift [--weights DIR | --random emu3|tiny] [--resolution 128x128]
                                       [--synthetic 4] [--images photo.jpg ...] [--mode graph]

On Ascend the tokenizer's Conv3d layers compute in fp16 whatever the model dtype
(`emu3.backend.conv3d_compute_dtype`). On the CPU, `conv3d_dtype="fp16"` computes the same thing.
This builds the tokenizer twice with the same weights, all fp32 and with fp16 Conv3d, and reports
for each image:
- codes: the fraction of identical codes;
- PSNR of the fp16-Conv3d reconstruction against the fp32 one, decoding the fp32 codes (the
  decoder's drift) and its own codes (encoder and decoder together). The peak is the fp32
  reconstruction's peak-to-peak range: random weights do not reconstruct the input, so the drift is
  measured against their own output scale.

Images: `--synthetic N` generated photo-like images (1/f-like colour fields, a light gradient,
flat-coloured occluding shapes) and any `--images` files (resized to cover the resolution, centre
crop). With random weights (default: BAAI's 271M-parameter architecture) the codebook is drawn
from a normal distribution fitted per channel to the fp32 latents of the images, so that the codes
spread over it as a trained codebook's would; MindSpore's default initialisation gives the rest.
"""

import argparse
import math
import time

import mindspore as ms
import numpy as np
from PIL import Image

from emu3 import backend
from emu3.cli.errors import command
from emu3.tokenizer import Emu3VisionVQConfig, Emu3VisionVQModel, layouts

RANDOM_CONFIGS = {
    "emu3": {},
    "tiny": dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m emu3.cli.vq_conv3d_drift", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--weights", help="tokenizer directory (BAAI's or transformers' layout)")
    source.add_argument("--random", choices=sorted(RANDOM_CONFIGS), default="emu3",
                        help="random weights of this architecture when no --weights (default %(default)s: BAAI's)")
    p.add_argument("--resolution", default="128x128", help="HxW pixels, multiples of 8 (default %(default)s)")
    p.add_argument("--synthetic", type=int, default=4, help="generated photo-like images (default %(default)s)")
    p.add_argument("--images", nargs="*", default=[], help="image files to measure as well")
    p.add_argument("--mode", choices=sorted(backend.MODES), default="graph", help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    args = p.parse_args(argv)
    try:
        args.height, args.width = (int(v) for v in args.resolution.lower().split("x"))
    except ValueError:
        p.error(f"--resolution must be HxW, got {args.resolution!r}")
    if args.synthetic < 0 or args.synthetic + len(args.images) == 0:
        p.error("nothing to measure: give --synthetic N > 0 or --images")
    return args


def synthetic_photos(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, 3, H, W) float32 photo-like images in [-1, 1].

    Natural images have an amplitude spectrum falling about as 1/f and colour channels that mostly
    share luminance: here three random fields with a 1/f^1.5 spectrum (a little smoother than a
    typical photo) mixed by a luminance-heavy colour matrix, a light gradient, and flat-coloured
    disks and rectangles that occlude them with sharp edges.
    """
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.hypot(fy, fx)
    freq[0, 0] = 1.0
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    images = []
    for _ in range(count):
        spectrum = (rng.normal(size=(3,) + freq.shape) + 1j * rng.normal(size=(3,) + freq.shape)) / freq ** 1.5
        fields = np.fft.irfft2(spectrum, s=(height, width))
        fields /= fields.std(axis=(1, 2), keepdims=True)
        mix = 0.1 * rng.normal(size=(3, 3)) + np.array([[0.8, 0.1, 0.1]] * 3)  # mostly one luminance
        image = np.einsum("cd,dhw->chw", mix, fields) * 0.35
        direction = rng.normal(size=2)
        image += 0.5 * (direction[0] * yy + direction[1] * xx)[None] + rng.uniform(-0.3, 0.3, (3, 1, 1))
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            size = rng.uniform(0.08, 0.3) * min(height, width)
            if rng.random() < 0.5:
                mask = (yy * max(height, width) - cy) ** 2 + (xx * max(height, width) - cx) ** 2 < size ** 2
            else:
                mask = (np.abs(yy * max(height, width) - cy) < size) & (np.abs(xx * max(height, width) - cx) < size / 2)
            shade = 0.1 * fields[0] * rng.uniform(0, 1)  # a little texture on the object
            image = np.where(mask[None], rng.uniform(-0.9, 0.9, (3, 1, 1)) + shade[None], image)
        images.append(np.clip(image, -1.0, 1.0))
    return np.stack(images).astype(np.float32)


def load_photo(path: str, height: int, width: int) -> np.ndarray:
    """An image file resized to cover HxW, centre-cropped, as float32 (3, H, W) in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.BICUBIC)
        top, left = (img.height - height) // 2, (img.width - width) // 2
        img = img.crop((left, top, left + width, top + height))
    return (np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the peak."""
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    peak = float(np.ptp(reference))
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def build_pair(args, config) -> tuple[Emu3VisionVQModel, Emu3VisionVQModel]:
    """The same weights twice: all fp32, and with fp16 Conv3d."""
    if args.weights:
        return (Emu3VisionVQModel.from_pretrained(args.weights, conv3d_dtype="fp32"),
                Emu3VisionVQModel.from_pretrained(args.weights, conv3d_dtype="fp16"))
    ms.set_seed(args.seed)
    fp32 = Emu3VisionVQModel(config, conv3d_dtype="fp32")
    fp16 = Emu3VisionVQModel(config, conv3d_dtype="fp16")
    ms.load_param_into_net(fp16, fp32.parameters_dict(), strict_load=True)
    return fp32, fp16


def fit_codebook(models, latents: list, seed: int) -> None:
    """Draw every model's codebook from a per-channel normal fitted to the fp32 latents."""
    flat = np.concatenate([lat.transpose(0, 2, 3, 4, 1).reshape(-1, lat.shape[1]) for lat in latents])
    rng = np.random.default_rng(seed)
    table = models[0].quantize.embedding.embedding_table
    codebook = rng.normal(flat.mean(0), flat.std(0), table.shape).astype(np.float32)
    for model in models:
        model.quantize.embedding.embedding_table.set_data(ms.Tensor(codebook))


@command
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    backend.set_run_mode(args.mode, "CPU")
    names = [f"synthetic {i}" for i in range(args.synthetic)] + list(args.images)
    images = list(synthetic_photos(args.synthetic, args.height, args.width, args.seed))
    images += [load_photo(path, args.height, args.width) for path in args.images]
    start = time.perf_counter()
    config = layouts.read_config(args.weights) if args.weights else Emu3VisionVQConfig(**RANDOM_CONFIGS[args.random])
    if args.height % config.spatial_factor or args.width % config.spatial_factor:
        raise ValueError(f"--resolution must be multiples of {config.spatial_factor}, got {args.resolution}")
    fp32, fp16 = build_pair(args, config)
    source = args.weights or f"{args.random} architecture, random weights (seed {args.seed})"
    print(f"tokenizer: {source}; {len(images)} images at {args.height}x{args.width}; {args.mode} mode on the CPU")

    def latents(model, image):
        return model.quant_conv(model.encoder(ms.Tensor(image[None, None]))).asnumpy()

    lat32 = [latents(fp32, image) for image in images]
    lat16 = [latents(fp16, image) for image in images]
    if not args.weights:
        fit_codebook((fp32, fp16), lat32, args.seed)
    rows = []
    for name, l32, l16 in zip(names, lat32, lat16):
        codes32 = fp32.quantize(ms.Tensor(l32))[:, 0]
        codes16 = fp16.quantize(ms.Tensor(l16))[:, 0]
        pixels32 = fp32.decode(codes32).asnumpy()
        rows.append({
            "image": name,
            "codes_identical": float((codes32.asnumpy() == codes16.asnumpy()).mean()),
            "psnr_same_codes": psnr(pixels32, fp16.decode(codes32).asnumpy()),
            "psnr_own_codes": psnr(pixels32, fp16.decode(codes16).asnumpy()),
            "latent_max_abs_diff": float(np.abs(l32 - l16).max()),
            "latent_std": float(l32.std()),
        })
    print("\n| image | codes identical | PSNR, fp32 codes (dB) | PSNR, own codes (dB) | latent max abs diff (latent std) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['codes_identical']:.2%} | {r['psnr_same_codes']:.1f} | {r['psnr_own_codes']:.1f} "
              f"| {r['latent_max_abs_diff']:.2e} ({r['latent_std']:.2e}) |")
    print(f"\nall images: codes identical {np.mean([r['codes_identical'] for r in rows]):.2%} "
          f"(min {min(r['codes_identical'] for r in rows):.2%}); PSNR fp32 codes min "
          f"{min(r['psnr_same_codes'] for r in rows):.1f} dB, own codes min {min(r['psnr_own_codes'] for r in rows):.1f} dB; "
          f"{time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
