"""Convolutional autoencoder with a pluggable bottleneck (discrete_ae/bottleneck.py, quantizers.py).

Data-range contract (the one place it is stated for the code): every image a user passes in or
gets back is a float tensor in [0, 1] of shape (B, 3, 32, 32). Internally the encoder sees
2x - 1 (zero-centred, in [-1, 1]) and the decoder ends in a sigmoid, so reconstructions are in
[0, 1] by construction.

    image (B, 3, 32, 32) -> Encoder -> z (B, C, 4, 4) -> quantizer -> z_q (B, C, 4, 4)
                         -> Decoder -> reconstruction (B, 3, 32, 32)

C is `latent_dim` (set by the levels for FSQ, FSP and residual FSQ, by log2(codebook_size) for
LFQ; the encoder emits 2C for the Gaussian VAE). codec.py codes whole photos as 32x32 blocks.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from discrete_ae import coding
from discrete_ae.errors import BitstreamError, ConfigError
from discrete_ae.geometry import IMAGE_SHAPE, LATENT_HW, LATENT_POSITIONS
from discrete_ae.priors import MAX_ALPHABET
from quantizers import build_quantizer, image_seeds, implied_latent_dim


class ModelOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, 32, 32) in [0, 1]
    z_q: torch.Tensor  # (B, C, 4, 4)
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    bits: torch.Tensor  # (B,)
    prior_loss: torch.Tensor  # trains the learned prior only (quantizers.QuantizerOutput)


def _act():
    return nn.SiLU()  # over ReLU: docs/recipe.md


class ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))), pre-activation (He et al., "Identity Mappings in Deep
    Residual Networks", ECCV 2016); used only at 8 and 4 px, where a 3x3 convolution is cheap."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(_act(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _act(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def _mid(channels, res_blocks):
    """The layers at one low-resolution scale: `res_blocks` residual blocks, or with none, a single
    activation + 3x3 convolution."""
    if res_blocks:
        return [ResBlock(channels) for _ in range(res_blocks)]
    return [_act(), nn.Conv2d(channels, channels, 3, padding=1)]


class Encoder(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> (B, out_channels, 4, 4); widths = channels of the three stages."""

    def __init__(self, channels, out_channels, res_blocks=0):
        super().__init__()
        c0, c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c0, 4, stride=2, padding=1), _act(),  # (B, c0, 16, 16)
            nn.Conv2d(c0, c1, 4, stride=2, padding=1),  # (B, c1, 8, 8)
            *([ResBlock(c1) for _ in range(res_blocks)]), _act(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 4, 4)
            *_mid(c2, res_blocks), _act(),
            nn.Conv2d(c2, out_channels, 1),  # (B, out_channels, 4, 4)
        )

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)


class Decoder(nn.Module):
    """(B, in_channels, 4, 4) -> (B, 3, 32, 32) in [0, 1]; mirrors the encoder."""

    def __init__(self, channels, in_channels, res_blocks=0):
        super().__init__()
        c0, c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c2, 3, padding=1),  # (B, c2, 4, 4)
            *_mid(c2, res_blocks), _act(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # (B, c1, 8, 8)
            *([ResBlock(c1) for _ in range(res_blocks)]), _act(),
            nn.ConvTranspose2d(c1, c0, 4, stride=2, padding=1), _act(),  # (B, c0, 16, 16)
            SubPixelConvTranspose2d(c0, 3),  # (B, 3, 32, 32) logits
        )

    def forward(self, z_q):
        h = z_q
        for layer in self.net:
            if isinstance(layer, nn.ConvTranspose2d):  # the upsampling layers (and what follows) in channels-last
                h = h.contiguous(memory_format=torch.channels_last)  # memory: oneDNN's faster kernels (docs/codec.md)
            h = layer(h)
        return torch.sigmoid(h.float())


class SubPixelConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d(kernel 4, stride 2, padding 1), its weights and state_dict as they are,
    computed as a 3x3 convolution to 4 x out_channels followed by a pixel shuffle (Shi et al.,
    "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional
    Neural Network", CVPR 2016; the equivalence: Aitken et al. 2017, arXiv:1707.02937): the same
    map up to float rounding. Output pixel (2i + a, 2j + b) reads inputs i - 1 .. i + 1 through
    kernel row a + 3 - 2 dy (dy = 0, 1, 2; outside 0..3: no tap). oneDNN runs it faster than the
    transposed convolution where out_channels is small, as for the decoder's last layer (docs/codec.md,
    "Speed")."""

    TAPS = torch.tensor([[3, 1, 4], [4, 2, 0]])  # (a, dy) -> kernel row; 4: the zero padded on

    def __init__(self, in_channels, out_channels):
        super().__init__(in_channels, out_channels, 4, stride=2, padding=1)

    def convolution(self, dtype):
        """(weight (Cout 4, Cin, 3, 3), bias (Cout 4,)) of the 3x3 convolution, channel c 4 + 2 a + b;
        without autograd, kept until a parameter changes (decoding calls this once per batch)."""
        key = (dtype,) + tuple((p.data_ptr(), p._version) for p in (self.weight, self.bias))
        if torch.is_grad_enabled() or self.__dict__.get("_convolution", (None,))[0] != key:
            w = F.pad(self.weight, (0, 1, 0, 1))  # (Cin, Cout, 5, 5)
            w = w[:, :, self.TAPS[:, None, :, None], self.TAPS[None, :, None, :]]  # (Cin, Cout, a 2, b 2, dy 3, dx 3)
            w = w.permute(1, 2, 3, 0, 4, 5).reshape(-1, self.in_channels, 3, 3)
            made = (w.to(dtype), self.bias.repeat_interleave(4).to(dtype))
            if torch.is_grad_enabled():
                return made
            self.__dict__["_convolution"] = (key, made)
        return self.__dict__["_convolution"][1]

    def forward(self, x):
        """x (B, Cin, H, W) -> (B, Cout, 2 H, 2 W): the pixel shuffle as one copy into the output's
        (B, Cout, H, 2, W, 2) layout, the same values as F.pixel_shuffle in about half its time."""
        y = F.conv2d(x, *self.convolution(x.dtype), padding=1)  # (B, Cout 4, H, W), channel c 4 + 2 a + b
        batch, _, h, w = y.shape
        out = y.new_empty(batch, self.out_channels, h, 2, w, 2)
        out.copy_(y.view(batch, self.out_channels, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3))
        return out.view(batch, self.out_channels, 2 * h, 2 * w)


def init_weights(module):
    """He (variance-preserving) init of every convolution: with PyTorch's default the latent is too
    small for DDCL's noise and collapses (docs/recipe.md)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


class QuantizedVAE(nn.Module):
    def __init__(self, encoder, quantizer, decoder):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        init_weights(self.encoder)
        init_weights(self.decoder)

    def forward(self, x, seed=0):
        """x: (B, 3, 32, 32) in [0, 1]. `seed` fixes DDCL's evaluation dither: one integer for the
        batch, or one per image."""
        q = self.quantizer(self.encoder(x), seed=seed)
        return ModelOutput(self.decoder(q.z_q), *q)

    @torch.no_grad()
    def encode(self, x, seed=0):
        """Images -> integer indices (what a sender transmits); None for bottlenecks without any."""
        return self.quantizer.indices(self.encoder(x), seed=seed)

    @torch.no_grad()
    def decode(self, indices, seed=0):
        """Indices (from `encode` with the same seed) -> images in [0, 1]."""
        return self.decoder(self.quantizer.decode_indices(indices, seed=seed))

    def stream_keys(self, seed, count):
        """What the checksum of each string covers besides its integers: the model and its seed."""
        seeds, per_image = image_seeds(seed)
        if per_image and len(seeds) != count:
            raise ConfigError(f"{len(seeds)} seeds for {count} images: pass one integer, or one seed per image")
        model = coding.fingerprint(self)
        return [model + s.to_bytes(8, "big", signed=True) for s in (seeds if per_image else seeds * count)]

    def coder(self, action="code"):
        """The bottleneck, which describes its integers to the coder; one line when it sends none."""
        q = self.quantizer
        if not q.has_indices:
            raise ConfigError(f"quantizer {type(q).__name__} sends no integers: nothing to {action}")
        return q

    @torch.no_grad()
    def compress(self, x, seed=0):
        """Images (B, 3, 32, 32) in [0, 1] -> B byte strings, one per image, holding everything the
        decoder needs besides this model and `seed` (an integer, or one per image; discrete_ae/coding.py: format).
        float16 and float64 images are converted to float32; NaN, inf or values outside [0, 1] are refused. Uses the learned
        prior, or the fitted one that evaluation stored. decompress(compress(x, s), s) equals
        decode(encode(x, s), s) bit for bit on the CPU, for any subset of the strings in any order."""
        q = self.coder("compress")
        x = check_images(x, "compress")
        if not len(x):
            return []
        was_training = self.training
        self.eval()
        try:
            indices = self.encode(x.to(next(self.parameters()).device), seed=seed)
        finally:
            self.train(was_training)
        keys = self.stream_keys(seed, len(x))
        tables = q.coding_tables(len(x), LATENT_POSITIONS, seed)
        return coding.compress(q.coding_values(indices).cpu().numpy(), tables, keys)

    @torch.no_grad()
    def decompress(self, strings, seed=0):
        """Byte strings of `compress` (any of them, in any order, with the seed used there) -> images
        (B, 3, 32, 32) in [0, 1]. A truncated, corrupted or foreign string raises BitstreamError."""
        q = self.coder("decompress")
        if isinstance(strings, (bytes, bytearray)):
            raise BitstreamError("decompress takes a list of byte strings (one per image); wrap one string: [data]")
        device = next(self.parameters()).device
        if not len(strings):
            return torch.empty(0, *IMAGE_SHAPE, device=device)
        keys = self.stream_keys(seed, len(strings))
        tables = q.coding_tables(len(strings), LATENT_POSITIONS, seed)
        values = torch.from_numpy(coding.decompress(strings, tables, keys))
        # decoding does not depend on the mode (no noise, no batch statistics): no mode switch
        return self.decode(q.indices_from_values(values, LATENT_HW).to(device), seed=seed)


def check_images(x, action, shape=IMAGE_SHAPE):
    """x as float32 images of `shape` (B, *shape) in [0, 1], or one ConfigError line saying what is wrong."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1 + len(shape) or (shape and tuple(x.shape[1:]) != shape) \
            or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"{action} takes float images (B, {', '.join(map(str, shape))}) in [0, 1]; got {got}")
    x = x.float()
    if x.numel():
        bad = int((~torch.isfinite(x)).sum())
        lo, hi = float(x.nan_to_num(0.5).min()), float(x.nan_to_num(0.5).max())
        if bad or lo < 0 or hi > 1:
            raise ConfigError(f"{action} takes images in [0, 1]; got values in [{lo:g}, {hi:g}]"
                              + (f" and {bad} NaN or inf" if bad else "") + ": clamp or rescale them first")
    return x


MODEL_ARG_KEYS = ("quantizer", "latent_dim", "channels", "res_blocks", "fsq_levels", "num_quantizers", "codebook_size",
                  "ddcl_delta", "ddcl_comm_weight", "vae_kl_weight", "entropy_model", "rate_weight")


def model_args_from_config(config):
    """The subset of the config that fixes the architecture (saved as `model_args`)."""
    return {key: config[key] for key in MODEL_ARG_KEYS}


# the largest value a config or a checkpoint may ask for: far above anything this repo trains, far
# below what exhausts memory while the model is built (docs/reliability.md)
BOUNDS = {"channels": 1024, "latent_dim": 256, "res_blocks": 32, "num_quantizers": 16, "codebook_size": 2**20}
MAX_CODES = MAX_ALPHABET  # prod(fsq_levels)


def check_bounds(args):
    for key, most in BOUNDS.items():
        values = args[key] if isinstance(args[key], (list, tuple)) else [args[key]]
        if any(isinstance(v, int) and v > most for v in values):
            raise ConfigError(f"{key}={args[key]!r} is above this repo's limit of {most}: a smaller value, please")
    levels = args["fsq_levels"]
    if isinstance(levels, (list, tuple)) and all(isinstance(v, int) and v > 0 for v in levels) and len(levels) <= 64:
        if math.prod(levels) > MAX_CODES:
            raise ConfigError(f"fsq_levels={list(levels)} make {math.prod(levels):,} codes, above this repo's limit of "
                              f"{MAX_CODES:,}: fewer or smaller levels, please")
    elif isinstance(levels, (list, tuple)) and len(levels) > 64:
        raise ConfigError(f"fsq_levels has {len(levels)} levels, above this repo's limit of 64")


def build_model(model_args):
    """Rebuild the model from `model_args` alone (training, checkpoints and notebooks use this)."""
    args = dict(model_args)
    missing = [k for k in MODEL_ARG_KEYS if k not in args]
    if missing:
        raise ConfigError(f"model_args lacks {', '.join(missing)}")
    check_bounds(args)
    implied = implied_latent_dim(args)  # checks the levels or codebook size first: they decide latent_dim
    channels = args["channels"]
    if not (isinstance(channels, (list, tuple)) and len(channels) == 3 and all(isinstance(c, int) and c > 0 for c in channels)):
        raise ConfigError(f"channels must be three positive integers (encoder widths at 16, 8, 4 px), e.g. [16, 32, 64]; got {channels!r}")
    if not isinstance(args["latent_dim"], int) or args["latent_dim"] < 1:
        raise ConfigError(f"latent_dim must be a positive integer; got {args['latent_dim']!r}")
    if not isinstance(args["res_blocks"], int) or args["res_blocks"] < 0:
        raise ConfigError(f"res_blocks must be an integer >= 0; got {args['res_blocks']!r}")
    if implied is not None and args["latent_dim"] != implied:
        raise ConfigError(f"latent_dim={args['latent_dim']} but {args['quantizer']} implies latent_dim = {implied}; "
                          "drop --latent_dim")
    quantizer = build_quantizer(args)
    return QuantizedVAE(Encoder(channels, quantizer.in_channels, args["res_blocks"]), quantizer,
                        Decoder(channels, args["latent_dim"], args["res_blocks"]))
