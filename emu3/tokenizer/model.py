"""Emu3VisionVQModel: BAAI's Emu3 vision tokenizer (a MoVQ-style video VQ-VAE) in MindSpore.

Pixels go through a per-frame 2D encoder (GroupNorm, swish, attention at the lowest resolution),
two causal temporal downsamplings and a BatchNorm3d residual stack, then a nearest-neighbour
lookup in a 32768x4 codebook. The decoder mirrors it, conditioning every 2D normalisation on the
quantised codes (SpatialNorm). The module tree and names follow BAAI's original
`modeling_emu3visionvq.py`, so its checkpoints load by name (see layouts.py).

A still image is what the reference encodes as 4 identical frames and decodes as frame 0 of 4.
The 2D stages act on each frame independently, so here they run once per image: the encoder
output is repeated in time only where the temporal convolutions need it, and the decoder's 2D
stages see only frame 0. Same numbers, a quarter of the work.

Precision: the 2D convolutions and attention run in the model's dtype (fp32, or fp16/bf16 as
on Ascend); the Conv3d layers in the dtype `backend.conv3d_compute_dtype` picks for the device
(fp16 on Ascend, whose Conv3d takes nothing else; the model dtype on CPU); GroupNorm,
BatchNorm3d, the attention softmax and the codebook search run in fp32.
"""

import math
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from emu3 import backend, weights
from emu3.tokenizer import layouts
from emu3.tokenizer.config import Emu3VisionVQConfig


def _conv2d(in_ch, out_ch, kernel, dtype, stride=1, padding=None):
    padding = kernel // 2 if padding is None else padding
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, pad_mode="pad", padding=padding,
                     has_bias=True, dtype=dtype)


def _swish(x):
    return x * ops.sigmoid(x)


class Emu3VisionVQGroupNorm(nn.GroupNorm):
    """GroupNorm(32, eps 1e-6) computed in fp32; `zq` is accepted and ignored so that blocks can
    call a plain norm and a SpatialNorm the same way."""

    def __init__(self, channels):
        super().__init__(32, channels, eps=1e-6)

    def construct(self, x, zq=None):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


class Emu3VisionVQBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d (running statistics, eps 1e-5) computed in fp32."""

    def construct(self, x):
        return super().construct(x.astype(ms.float32)).astype(x.dtype)


class Emu3VisionVQSpatialNorm(nn.Cell):
    """GroupNorm(x) modulated by the quantised latent: norm(x) * conv_y(zq) + conv_b(zq), with zq
    resized (nearest) to x's resolution."""

    def __init__(self, channels, zq_channels, dtype):
        super().__init__()
        self.norm_layer = Emu3VisionVQGroupNorm(channels)
        self.conv_y = _conv2d(zq_channels, channels, 1, dtype)
        self.conv_b = _conv2d(zq_channels, channels, 1, dtype)

    def construct(self, x, zq):
        zq = ops.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _norm(channels, zq_channels, dtype):
    if zq_channels is None:
        return Emu3VisionVQGroupNorm(channels)
    return Emu3VisionVQSpatialNorm(channels, zq_channels, dtype)


class Emu3VisionVQResnetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, zq_channels, dtype):
        super().__init__()
        self.norm1 = _norm(in_channels, zq_channels, dtype)
        self.conv1 = _conv2d(in_channels, out_channels, 3, dtype)
        self.norm2 = _norm(out_channels, zq_channels, dtype)
        self.conv2 = _conv2d(out_channels, out_channels, 3, dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.nin_shortcut = _conv2d(in_channels, out_channels, 1, dtype)

    def construct(self, x, zq=None):
        h = self.conv1(_swish(self.norm1(x, zq)))
        h = self.conv2(_swish(self.norm2(h, zq)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class Emu3VisionVQAttnBlock(nn.Cell):
    """Single-head self-attention over all positions of a frame, with 1x1-conv projections."""

    def __init__(self, channels, zq_channels, dtype):
        super().__init__()
        self.norm = _norm(channels, zq_channels, dtype)
        self.q = _conv2d(channels, channels, 1, dtype)
        self.k = _conv2d(channels, channels, 1, dtype)
        self.v = _conv2d(channels, channels, 1, dtype)
        self.proj_out = _conv2d(channels, channels, 1, dtype)
        self.scale = 1.0 / math.sqrt(channels)

    def construct(self, x, zq=None):
        nx = self.norm(x, zq)
        b, c, h, w = x.shape
        # Scaling q before the product (not the scores after) keeps fp16 scores in range.
        q = (self.q(nx) * self.scale).reshape(b, c, h * w)
        k = self.k(nx).reshape(b, c, h * w)
        v = self.v(nx).reshape(b, c, h * w)
        scores = ops.bmm(ops.swapaxes(q, 1, 2), k)
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(v.dtype)
        out = ops.bmm(v, ops.swapaxes(probs, 1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Emu3VisionVQDownsample(nn.Cell):
    def __init__(self, channels, dtype):
        super().__init__()
        # The reference pads right and bottom only, then convolves with stride 2.
        self.conv = _conv2d(channels, channels, 3, dtype, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x):
        return self.conv(x)


class Emu3VisionVQUpsample(nn.Cell):
    def __init__(self, channels, dtype):
        super().__init__()
        self.conv = _conv2d(channels, channels, 3, dtype)

    def construct(self, x):
        h, w = x.shape[-2:]
        return self.conv(ops.interpolate(x, size=(2 * h, 2 * w), mode="nearest"))


class Emu3VisionVQConv3d(nn.Conv3d):
    """nn.Conv3d that convolves in `compute_dtype` and returns its input's dtype.

    The weights keep the model dtype, so a checkpoint saves what it loaded; the bias is added
    after the cast back. The Conv3d weights of this model are small (z_channels = 4), so casting
    them at each call costs nothing measurable.
    """

    def __init__(self, *args, compute_dtype, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_dtype = compute_dtype

    def construct(self, x):
        out = self.conv3d(x.astype(self.compute_dtype), self.weight.astype(self.compute_dtype))
        return self.bias_add(out.astype(x.dtype), self.bias)


class Emu3VisionVQCausalConv3d(nn.Cell):
    """Conv3d over (B, C, T, H, W) that pads time by 2 in front only (causal) and space by
    kernel - stride, the odd pixel on the leading side. `dtype` is the weights' dtype,
    `conv3d_dtype` the one it computes in."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, dtype, conv3d_dtype):
        super().__init__()
        padding = (2, 0)
        for k, s in zip(kernel_size[1:], stride[1:]):
            p = k - s
            padding += (p // 2 + p % 2, p // 2)
        self.conv = Emu3VisionVQConv3d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                                       padding=padding, has_bias=True, dtype=dtype, compute_dtype=conv3d_dtype)

    def construct(self, x):
        return self.conv(x)


class Emu3VisionVQTemporalDownsample(nn.Cell):
    def __init__(self, channels, dtype, conv3d_dtype):
        super().__init__()
        self.conv = Emu3VisionVQCausalConv3d(channels, channels, (4, 3, 3), (2, 1, 1), dtype, conv3d_dtype)

    def construct(self, x):
        return self.conv(x)


class Emu3VisionVQTemporalUpsample(nn.Cell):
    def __init__(self, channels, dtype, conv3d_dtype):
        super().__init__()
        self.conv = Emu3VisionVQCausalConv3d(channels, channels, (3, 3, 3), (1, 1, 1), dtype, conv3d_dtype)

    def construct(self, x):
        b, c, t, h, w = x.shape
        # Nearest x2 in time: every frame twice.
        x = ops.broadcast_to(x[:, :, :, None], (b, c, t, 2, h, w)).reshape(b, c, 2 * t, h, w)
        return self.conv(x)


class Emu3VisionVQResnetTemporalBlock(nn.Cell):
    def __init__(self, channels, dtype, conv3d_dtype):
        super().__init__()
        self.norm1 = Emu3VisionVQBatchNorm3d(channels)
        self.conv1 = Emu3VisionVQCausalConv3d(channels, channels, (3, 3, 3), (1, 1, 1), dtype, conv3d_dtype)
        self.norm2 = Emu3VisionVQBatchNorm3d(channels)
        self.conv2 = Emu3VisionVQCausalConv3d(channels, channels, (3, 3, 3), (1, 1, 1), dtype, conv3d_dtype)

    def construct(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return x + h


class Emu3VisionVQDownLevel(nn.Cell):
    def __init__(self, block_in, block_out, num_blocks, has_attn, has_downsample, dtype):
        super().__init__()
        self.block = nn.CellList()
        self.attn = nn.CellList()
        for _ in range(num_blocks):
            self.block.append(Emu3VisionVQResnetBlock(block_in, block_out, None, dtype))
            block_in = block_out
            if has_attn:
                self.attn.append(Emu3VisionVQAttnBlock(block_out, None, dtype))
        self.has_attn = has_attn
        self.has_downsample = has_downsample
        if has_downsample:
            self.downsample = Emu3VisionVQDownsample(block_out, dtype)

    def construct(self, x):
        for i in range(len(self.block)):
            x = self.block[i](x)
            if self.has_attn:
                x = self.attn[i](x)
        if self.has_downsample:
            x = self.downsample(x)
        return x


class Emu3VisionVQUpLevel(nn.Cell):
    def __init__(self, block_in, block_out, num_blocks, has_attn, has_upsample, zq_channels, dtype):
        super().__init__()
        self.block = nn.CellList()
        self.attn = nn.CellList()
        for _ in range(num_blocks):
            self.block.append(Emu3VisionVQResnetBlock(block_in, block_out, zq_channels, dtype))
            block_in = block_out
            if has_attn:
                self.attn.append(Emu3VisionVQAttnBlock(block_out, zq_channels, dtype))
        self.has_attn = has_attn
        self.has_upsample = has_upsample
        if has_upsample:
            self.upsample = Emu3VisionVQUpsample(block_out, dtype)

    def construct(self, x, zq):
        for i in range(len(self.block)):
            x = self.block[i](x, zq)
            if self.has_attn:
                x = self.attn[i](x, zq)
        if self.has_upsample:
            x = self.upsample(x)
        return x


class Emu3VisionVQMid(nn.Cell):
    def __init__(self, channels, zq_channels, dtype):
        super().__init__()
        self.block_1 = Emu3VisionVQResnetBlock(channels, channels, zq_channels, dtype)
        self.attn_1 = Emu3VisionVQAttnBlock(channels, zq_channels, dtype)
        self.block_2 = Emu3VisionVQResnetBlock(channels, channels, zq_channels, dtype)

    def construct(self, x, zq=None):
        return self.block_2(self.attn_1(self.block_1(x, zq), zq), zq)


class Emu3VisionVQEncoder(nn.Cell):
    """Frames (B, T, C, H, W) -> latents (B, z, T/4, H/8, W/8).

    T == 1 stands for a still image: its single 2D encoding is repeated to the temporal factor,
    which is exactly what encoding the image repeated 4 times gives.
    """

    def __init__(self, config: Emu3VisionVQConfig, dtype, conv3d_dtype):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.temporal_factor = config.temporal_downsample_factor
        self.conv_in = _conv2d(config.in_channels, ch, 3, dtype)
        in_mult = (1,) + tuple(mult)
        self.down = nn.CellList()
        for level in range(len(mult)):
            self.down.append(Emu3VisionVQDownLevel(
                ch * in_mult[level], ch * mult[level], config.num_res_blocks,
                level in config.attn_resolutions, level != len(mult) - 1, dtype))
        block_in = ch * mult[-1]
        self.mid = Emu3VisionVQMid(block_in, None, dtype)
        self.norm_out = Emu3VisionVQGroupNorm(block_in)
        self.conv_out = _conv2d(block_in, config.z_channels, 3, dtype)
        self.time_conv = nn.CellList([
            Emu3VisionVQTemporalDownsample(config.z_channels, dtype, conv3d_dtype)
            for _ in range(int(math.log2(self.temporal_factor)))
        ])
        self.time_res_stack = nn.CellList([
            Emu3VisionVQResnetTemporalBlock(config.z_channels, dtype, conv3d_dtype)
            for _ in range(config.num_res_blocks)
        ])

    def encode_frames(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))

    def construct(self, frames):
        b, t = frames.shape[:2]
        h = self.encode_frames(frames.reshape((b * t,) + frames.shape[2:]))
        h = ops.transpose(h.reshape((b, t) + h.shape[1:]), (0, 2, 1, 3, 4))
        if t == 1:
            h = ops.broadcast_to(h, (h.shape[0], h.shape[1], self.temporal_factor, h.shape[3], h.shape[4]))
        for conv in self.time_conv:
            h = _swish(conv(h))
        for block in self.time_res_stack:
            h = block(h)
        return h


class Emu3VisionVQDecoder(nn.Cell):
    """Latents z and quantised codebook vectors zq, both (B, c, t, h, w) -> frames (B*4t, 3, 8h, 8w),
    or (B, 3, 8h, 8w) with `first_frame_only` (a still image: the reference keeps frame 0 of 4)."""

    def __init__(self, config: Emu3VisionVQConfig, dtype, conv3d_dtype):
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        zq_ch = config.embed_dim
        self.time_res_stack = nn.CellList([
            Emu3VisionVQResnetTemporalBlock(config.z_channels, dtype, conv3d_dtype)
            for _ in range(config.num_res_blocks)
        ])
        self.time_conv = nn.CellList([
            Emu3VisionVQTemporalUpsample(config.z_channels, dtype, conv3d_dtype)
            for _ in range(int(math.log2(config.temporal_downsample_factor)))
        ])
        block_in = ch * mult[-1]
        self.conv_in = _conv2d(config.z_channels, block_in, 3, dtype)
        self.mid = Emu3VisionVQMid(block_in, zq_ch, dtype)
        up = []
        for level in reversed(range(len(mult))):
            up.insert(0, Emu3VisionVQUpLevel(
                block_in, ch * mult[level], config.num_res_blocks + 1,
                level in config.attn_resolutions, level != 0, zq_ch, dtype))
            block_in = ch * mult[level]
        self.up = nn.CellList(up)
        self.norm_out = Emu3VisionVQSpatialNorm(block_in, zq_ch, dtype)
        self.conv_out = _conv2d(block_in, config.out_channels, 3, dtype)

    def construct(self, z, zq, first_frame_only=False):
        # The temporal stack sees z and zq as one batch, as in the reference (BatchNorm uses
        # running statistics, so the batch makes no numerical difference).
        b = z.shape[0]
        h = ops.concat((z, zq), 0)
        for block in self.time_res_stack:
            h = block(h)
        for conv in self.time_conv:
            h = _swish(conv(h))
        if first_frame_only:
            h = h[:, :, :1]
        h = ops.transpose(h, (0, 2, 1, 3, 4))
        h = h.reshape((h.shape[0] * h.shape[1],) + h.shape[2:])
        frames = h.shape[0] // 2
        h, zq = h[:frames], h[frames:]
        h = self.conv_in(h)
        h = self.mid(h, zq)
        for i in range(len(self.up) - 1, -1, -1):
            h = self.up[i](h, zq)
        return self.conv_out(_swish(self.norm_out(h, zq)))


class Emu3VisionVQVectorQuantizer(nn.Cell):
    """Nearest codebook entry by |z|^2 + |e|^2 - 2 z.e, in fp32, as the reference computes it."""

    def __init__(self, config: Emu3VisionVQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.embed_dim)

    def construct(self, z):
        b, c, t, h, w = z.shape
        flat = ops.transpose(z, (0, 2, 3, 4, 1)).reshape(-1, c).astype(ms.float32)
        codebook = self.embedding.embedding_table
        distances = (ops.sum(flat * flat, 1, keepdim=True) + ops.sum(codebook * codebook, 1)) \
            - 2 * ops.matmul(flat, codebook.T)
        return ops.argmin(distances, 1).astype(ms.int32).reshape(b, t, h, w)

    def lookup(self, codes):
        """(B, t, h, w) codes -> codebook vectors (B, embed_dim, t, h, w) in fp32."""
        vectors = ops.gather(self.embedding.embedding_table, codes.reshape(-1), 0)
        return ops.transpose(vectors.reshape(codes.shape + (vectors.shape[-1],)), (0, 4, 1, 2, 3))


class Emu3VisionVQModel(nn.Cell):
    """Emu3's vision tokenizer: `encode` pixels to codes, `decode` codes to pixels.

    `dtype` ("fp32", "fp16", "bf16" on Ascend) is the weights' and the computation's dtype.
    `conv3d_dtype` is the one the Conv3d layers compute in; None lets the device decide (fp16 on
    Ascend, `dtype` on CPU). conv3d_dtype="fp16" on the CPU computes what an NPU computes.
    """

    def __init__(self, config: Emu3VisionVQConfig, dtype="fp32", conv3d_dtype=None):
        super().__init__()
        self.config = config
        self.dtype = backend.parse_dtype(dtype)
        self.conv3d_dtype = (backend.conv3d_compute_dtype(self.dtype) if conv3d_dtype is None
                             else backend.parse_dtype(conv3d_dtype))
        self.encoder = Emu3VisionVQEncoder(config, self.dtype, self.conv3d_dtype)
        self.decoder = Emu3VisionVQDecoder(config, self.dtype, self.conv3d_dtype)
        self.quantize = Emu3VisionVQVectorQuantizer(config)
        self.quant_conv = Emu3VisionVQCausalConv3d(config.z_channels, config.embed_dim, (3, 1, 1), (1, 1, 1),
                                                   self.dtype, self.conv3d_dtype)
        self.post_quant_conv = Emu3VisionVQCausalConv3d(config.embed_dim, config.z_channels, (3, 1, 1),
                                                        (1, 1, 1), self.dtype, self.conv3d_dtype)
        self.set_train(False)

    # ---------------------------------------------------------------- inference
    def encode(self, x) -> ms.Tensor:
        """(B, 3, H, W) image or (B, T, 3, H, W) video in [-1, 1] -> int32 codes (B, H/8, W/8) or
        (B, T/4, H/8, W/8). H and W must be multiples of 8, T a multiple of 4."""
        x = ms.Tensor(x) if isinstance(x, np.ndarray) else x
        is_image = x.ndim == 4
        if x.ndim not in (4, 5):
            raise ValueError(f"encode expects (B, 3, H, W) images or (B, T, 3, H, W) videos, got shape {x.shape}")
        self._check_frames(x.shape)
        frames = x[:, None] if is_image else x
        latents = self.quant_conv(self.encoder(frames.astype(self.dtype)))
        codes = self.quantize(latents)
        return codes[:, 0] if is_image else codes

    def decode(self, codes) -> ms.Tensor:
        """(B, h, w) codes -> float32 pixels (B, 3, 8h, 8w); (B, t, h, w) -> (B, 4t, 3, 8h, 8w)."""
        codes = ms.Tensor(codes) if isinstance(codes, np.ndarray) else codes
        if codes.ndim not in (3, 4):
            raise ValueError(f"decode expects (B, h, w) image codes or (B, t, h, w) video codes, got {codes.shape}")
        self._check_codes(codes)
        is_image = codes.ndim == 3
        codes = codes.astype(ms.int32)
        if is_image:
            codes = codes[:, None]
        b, t, h, w = codes.shape
        zq = self.quantize.lookup(codes).astype(self.dtype)
        frames = self.decoder(self.post_quant_conv(zq), zq, is_image).astype(ms.float32)
        if is_image:
            return frames
        return frames.reshape((b, t * self.config.temporal_downsample_factor) + frames.shape[1:])

    def _check_frames(self, shape):
        c, height, width = shape[-3:]
        if c != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} colour channels at dim -3, got shape {shape}")
        f = self.config.spatial_factor
        if height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of {f}, got {height}x{width}; resize with "
                f"Emu3VisionVQImageProcessor (smart_resize) or crop to a multiple of {f}"
            )
        if len(shape) == 5:
            t, tf = shape[1], self.config.temporal_downsample_factor
            if t < tf or t % tf:
                raise ValueError(
                    f"a video needs a multiple of {tf} frames (at least {tf}), got {t}; drop the last "
                    f"{t % tf} frame(s) or repeat the last frame up to {max(tf, -(-t // tf) * tf)}"
                )

    def _check_codes(self, codes):
        if codes.dtype not in (ms.int32, ms.int64, ms.int16, ms.uint8, ms.int8):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.config.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got values in [{lo}, {hi}]")

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, directory, dtype="fp32", conv3d_dtype=None) -> "Emu3VisionVQModel":
        """Load BAAI's Emu3-VisionTokenizer directory, or a transformers Emu3VQVAE / Emu3 "-hf"
        directory (the layout is detected from the tensor names)."""
        config = layouts.read_config(directory)
        model = cls(config, dtype=dtype, conv3d_dtype=conv3d_dtype)
        layouts.load_weights(model, directory)
        return model

    def save_pretrained(self, directory) -> None:
        """Write config.json and model.safetensors in BAAI's original layout."""
        tensors = layouts.original_state_dict(self)
        weights.write_checkpoint(tensors, Path(directory), self.config.to_dict())

    def eval(self) -> "Emu3VisionVQModel":
        """Inference mode (PyTorch's name for set_train(False)); returns the model."""
        self.set_train(False)
        return self
