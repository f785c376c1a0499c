"""Convolutional autoencoder with a pluggable bottleneck (quantizers.py).

Data-range contract (the one place it is stated for the code): every image a user passes in or
gets back is a float tensor in [0, 1] of shape (B, 3, 32, 32). Internally the encoder sees
2x - 1 (zero-centred, in [-1, 1]) and the decoder ends in a sigmoid, so reconstructions are in
[0, 1] by construction.

    image (B, 3, 32, 32) -> Encoder -> z (B, C, 4, 4) -> quantizer -> z_q (B, C, 4, 4)
                         -> Decoder -> reconstruction (B, 3, 32, 32)

C is `latent_dim` (len(fsq_levels) for FSQ; the encoder emits 2C for the Gaussian VAE).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from quantizers import ConfigError, build_quantizer, implied_latent_dim

class ModelOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, 32, 32) in [0, 1]
    z_q: torch.Tensor  # (B, C, 4, 4)
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    bits: torch.Tensor  # (B,)


def _act():
    return nn.SiLU()


class Encoder(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> (B, out_channels, 4, 4); widths = channels of the three stages."""

    def __init__(self, channels, out_channels):
        super().__init__()
        c0, c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c0, 4, stride=2, padding=1), _act(),  # (B, c0, 16, 16)
            nn.Conv2d(c0, c1, 4, stride=2, padding=1), _act(),  # (B, c1, 8, 8)
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), _act(),  # (B, c2, 4, 4)
            nn.Conv2d(c2, c2, 3, padding=1), _act(),
            nn.Conv2d(c2, out_channels, 1),  # (B, out_channels, 4, 4)
        )

    def forward(self, x):
        return self.net(x * 2.0 - 1.0)


class Decoder(nn.Module):
    """(B, in_channels, 4, 4) -> (B, 3, 32, 32) in [0, 1]; mirrors the encoder."""

    def __init__(self, channels, in_channels):
        super().__init__()
        c0, c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c2, 3, padding=1), _act(),  # (B, c2, 4, 4)
            nn.Conv2d(c2, c2, 3, padding=1), _act(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), _act(),  # (B, c1, 8, 8)
            nn.ConvTranspose2d(c1, c0, 4, stride=2, padding=1), _act(),  # (B, c0, 16, 16)
            nn.ConvTranspose2d(c0, 3, 4, stride=2, padding=1),  # (B, 3, 32, 32) logits
        )

    def forward(self, z_q):
        return torch.sigmoid(self.net(z_q).float())


def init_weights(module):
    """Variance-preserving (He) init for every convolution. PyTorch's default init shrinks the
    signal at each layer: the latent's spread across images started at 0.002 (delta = 0.067), so
    DDCL's noise hid it, the decoder learned nothing from it and the rate term collapsed it to 0.
    With He init it starts at about 0.15-0.2 (measured on random images, widths 8-64)."""
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
        """x: (B, 3, 32, 32) in [0, 1]. `seed` fixes the DDCL evaluation dither of this batch."""
        q = self.quantizer(self.encoder(x), seed=seed)
        return ModelOutput(self.decoder(q.z_q), *q)

    @torch.no_grad()
    def encode(self, x, seed=0):
        """Images -> integer indices (what a sender transmits); None for bottlenecks without any."""
        return self.quantizer(self.encoder(x), seed=seed).indices

    @torch.no_grad()
    def decode(self, indices, seed=0):
        """Indices (from `encode` with the same seed) -> images in [0, 1]."""
        return self.decoder(self.quantizer.decode_indices(indices, seed=seed))


MODEL_ARG_DEFAULTS = dict(
    quantizer="ddcl", latent_dim=4, channels=[16, 32, 64], fsq_levels=[8, 6, 6, 5],
    ddcl_delta=1 / 15, ddcl_comm_weight=1e-3, vq_codebook_size=1024, vq_decay=0.99,
    vq_commitment_weight=0.25, vq_dead_code_threshold=2, vae_kl_weight=1e-3,
)


def model_args_from_config(config):
    """The subset of the config that fixes the architecture (saved as `model_args`)."""
    return {key: config[key] for key in MODEL_ARG_DEFAULTS}


def build_model(model_args):
    """Rebuild the model from `model_args` alone (training, checkpoints and notebooks use this)."""
    args = {**MODEL_ARG_DEFAULTS, **model_args}
    channels = args["channels"]
    if not (isinstance(channels, (list, tuple)) and len(channels) == 3 and all(isinstance(c, int) and c > 0 for c in channels)):
        raise ConfigError(f"channels must be three positive integers (encoder widths at 16, 8, 4 px), e.g. [16, 32, 64]; got {channels!r}")
    if not isinstance(args["latent_dim"], int) or args["latent_dim"] < 1:
        raise ConfigError(f"latent_dim must be a positive integer; got {args['latent_dim']!r}")
    implied = implied_latent_dim(args)
    if implied is not None and args["latent_dim"] != implied:
        raise ConfigError(f"latent_dim={args['latent_dim']} but {args['quantizer']} implies latent_dim = {implied}")
    quantizer = build_quantizer(args)
    return QuantizedVAE(Encoder(channels, quantizer.in_channels), quantizer, Decoder(channels, args["latent_dim"]))
