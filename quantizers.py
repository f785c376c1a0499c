"""Pluggable bottlenecks for the autoencoder in models.py.

Every bottleneck takes the encoder's latent z of shape (B, C, H, W) and returns the same small
named result, `QuantizerOutput`, so that training, evaluation and plots never branch on the
quantizer's name:

    z_q      (B, C, H, W) float   what the decoder sees
    indices  integer tensor or None: the symbols a sender would transmit
             FSQ / VQ: (B, H, W), one code per latent position, in [0, codebook_size)
             DDCL:     (B, C, H, W), one signed integer per latent value
    aux_loss scalar tensor, already weighted, added to the reconstruction loss
    bits     (B,) float tensor, the quantizer's own estimate of bits per image (detached):
             FSQ / VQ: fixed-length code, DDCL: the communication-cost surrogate,
             none: 32-bit floats, vae: the KL divergence in bits

Measured rates (entropy under a fitted prior, an actual entropy-coded bitstream) are computed from
`indices` by evaluate.py; a quantizer only says how its indices split into independent streams
(`num_streams`) and how big its alphabet is (`codebook_size`, None when unbounded).

Choices: fsq, ddcl, vq, none, vae (see `build_quantizer`).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from errors import ConfigError


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    bits: torch.Tensor


class Bottleneck(nn.Module):
    """What every bottleneck tells the rest of the repo, said once.

    in_channels    channels the encoder must emit
    codebook_size  size of the index alphabet; None when unbounded (DDCL) or without indices
    num_streams    independent index streams, each with its own rate prior (0 without indices)
    rate_label     what the `bits` of its output are when nothing was measured
    """

    codebook_size = None
    num_streams = 0
    rate_label = "estimate"

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels

    def settings(self):
        """A short label of the settings that change the rate (shown in tables and plots)."""
        raise NotImplementedError

    def decode_indices(self, indices, seed=0):
        raise TypeError(f"{type(self).__name__} has no indices to decode")

    def fixed_length_bits(self, indices):
        raise TypeError(f"{type(self).__name__} has no indices")


class CodebookBottleneck(Bottleneck):
    """A bottleneck that sends one code in [0, codebook_size) per latent position (FSQ, VQ)."""

    num_streams = 1  # one code per position, all positions share one prior
    rate_label = "fixed-length"

    def __init__(self, in_channels, codebook_size):
        super().__init__(in_channels)
        self.codebook_size = codebook_size

    def fixed_length_bits(self, indices):
        """A plain code: log2(codebook_size) bits per latent position."""
        return indices[0].numel() * math.log2(self.codebook_size)

    def code_bits(self, z):
        """(B,) the fixed-length rate of one image, as the output's `bits`."""
        return _constant_bits(z, _latent_positions(z) * math.log2(self.codebook_size))

    def decode_indices(self, indices, seed=None):
        check_index_range(indices, self.codebook_size)
        return self.codes(indices)


def _latent_positions(z):
    return z.shape[-2] * z.shape[-1]


def _constant_bits(z, bits_per_image):
    return torch.full((z.shape[0],), float(bits_per_image), device=z.device)


def _zero(z):
    return z.new_zeros(())


class FSQWrapper(CodebookBottleneck):
    """Finite Scalar Quantization through `vector_quantize_pytorch.FSQ` (no hand-written FSQ).

    Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization: VQ-VAE Made Simple",
    ICLR 2024 (arXiv 2309.15505). Channel i is bounded and rounded to levels[i] values; the
    implicit codebook has prod(levels) codes. The encoder emits exactly len(levels) channels, so
    the library adds no projections (its `dim` equals len(levels)).
    """

    def __init__(self, levels):
        levels = validate_fsq_levels(levels)
        super().__init__(len(levels), math.prod(levels))
        from vector_quantize_pytorch import FSQ

        try:
            self.fsq = FSQ(levels=levels)
        except AssertionError as err:  # the library refuses some level sets (e.g. a level of 2)
            raise ConfigError(f"fsq_levels={levels} refused by vector_quantize_pytorch.FSQ: {err}") from None
        self.levels = levels

    def settings(self):
        return f"levels={self.levels}"

    def forward(self, z, seed=None):
        # z: (B, C, H, W) with C == len(levels); FSQ treats 4-D input as channel-first.
        z_q, indices = self.fsq(z)
        return QuantizerOutput(z_q, indices.long(), _zero(z), self.code_bits(z))  # indices (B, H, W)

    def codes(self, indices):
        return self.fsq.indices_to_codes(indices)  # (B, C, H, W)


def validate_fsq_levels(levels):
    if not isinstance(levels, (list, tuple)) or not levels or not all(isinstance(l, int) and not isinstance(l, bool) for l in levels):
        raise ConfigError(f"fsq_levels must be a non-empty list of integers, e.g. [8, 6, 6, 5]; got {levels!r}")
    if any(l < 3 for l in levels):
        raise ConfigError(f"fsq_levels={list(levels)}: every level must be >= 3 (FSQ refuses 2 without preserve_symmetry, and 0 or 1 carries no information)")
    return list(levels)


def check_index_range(indices, codebook_size):
    """FSQ/VQ indices must lie in [0, codebook_size): out-of-range codes were reported upstream."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(f"indices outside [0, {codebook_size}): min {int(indices.min())}, max {int(indices.max())}")


class DDCL_Bottleneck(Bottleneck):
    """Differentiable Discrete Communication Learning.

    Freed, Sartoretti, Hu, Choset, "Communication Learning via Backpropagation in Discrete Channels
    with Unknown Noise", AAAI 2020; Kapoor, Bhisikar, Freed, Peters, Sun, "Learning what to say
    and how precisely", arXiv 2511.01554.

    Training: z_tilde = z + u with u ~ U(-delta/2, delta/2), fresh per element; no rounding in the
    graph, so d z_tilde / d z = 1 exactly. The communication cost of one value is
    log2(2|z|/delta + 1) bits; its mean over latent values, times `comm_weight`, is the auxiliary
    loss.

    Evaluation: real quantization with subtractive dither, mid-tread (Ziv's universal quantization;
    Agustsson & Theis, NeurIPS 2020): m = round((z + u)/delta) are the integers sent and
    z_hat = m*delta - u. Then z_hat - z is uniform on [-delta/2, delta/2] and independent of z, the
    same channel as in training. u comes from a CPU generator seeded per batch (`seed`), so a
    receiver on any device regenerates the same u from the seed and the shape alone. Mid-tread
    (round, not floor) because E|m| = |z|/delta then, so by Jensen the surrogate upper-bounds the
    length of a signed integer code.

    In training mode `indices` are round(z_tilde/delta): the integers the dithered quantizer would
    send for the same u (free to compute, used only for statistics).
    """

    rate_label = "surrogate"

    def __init__(self, latent_dim, delta, comm_weight):
        super().__init__(latent_dim)
        self.delta = validate_ddcl(delta, comm_weight)
        self.comm_weight = float(comm_weight)
        self.num_streams = latent_dim  # unbounded signed integers, one prior per latent channel

    def settings(self):
        return f"delta={self.delta:.4g} w={self.comm_weight:g}"

    def dither(self, shape, seed, device):
        """u ~ U(-delta/2, delta/2) of `shape`, reproducible from `seed` on any device."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        return ((torch.rand(shape, generator=gen) - 0.5) * self.delta).to(device)

    def comm_bits(self, z):
        """log2(2|z|/delta + 1) per latent value, (B, C, H, W). Keep the factor 2 (see the notes)."""
        return torch.log2(2.0 * z.abs() / self.delta + 1.0)

    def forward(self, z, seed=0):
        z = z.float()  # (B, C, H, W); fp32 even under bf16 autocast, so the noise is not rounded away
        cost = self.comm_bits(z)  # (B, C, H, W) bits per value
        aux = self.comm_weight * cost.mean()
        bits = cost.detach().flatten(1).sum(1)
        if self.training:
            z_tilde = z + (torch.rand_like(z) - 0.5) * self.delta
            return QuantizerOutput(z_tilde, torch.round(z_tilde.detach() / self.delta).long(), aux, bits)
        u = self.dither(z.shape, seed, z.device)
        m = torch.round((z + u) / self.delta)
        return QuantizerOutput(m * self.delta - u, m.long(), aux, bits)

    def decode_indices(self, indices, seed=0):
        u = self.dither(indices.shape, seed, indices.device)
        return indices.float() * self.delta - u

    def fixed_length_bits(self, indices):
        """The naive code: every value gets ceil(log2(number of distinct values seen)) bits."""
        distinct = torch.unique(indices).numel()
        return indices[0].numel() * (math.ceil(math.log2(distinct)) if distinct > 1 else 0)


def validate_ddcl(delta, comm_weight):
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not math.isfinite(delta) or delta <= 0:
        raise ConfigError(f"ddcl_delta must be a finite number > 0 (the quantization step), e.g. 1/15; got {delta!r}")
    if not isinstance(comm_weight, (int, float)) or comm_weight < 0:
        raise ConfigError(f"ddcl_comm_weight must be a number >= 0; got {comm_weight!r}")
    return float(delta)


class VQWrapper(CodebookBottleneck):
    """Vector quantization with an EMA codebook through `vector_quantize_pytorch.VectorQuantize`.

    van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017
    (EMA updates: appendix). Each latent position (a C-vector) maps to one of `codebook_size` codes;
    the auxiliary loss is the library's commitment loss; dead codes (EMA cluster size below
    `dead_code_threshold`) are re-seeded from the batch by the library.
    """

    def __init__(self, latent_dim, codebook_size, decay, commitment_weight, dead_code_threshold):
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ConfigError(f"vq_codebook_size must be an integer >= 2; got {codebook_size!r}")
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"vq_decay must be in (0, 1), e.g. 0.99; got {decay!r}")
        if commitment_weight < 0 or dead_code_threshold < 0:
            raise ConfigError("vq_commitment_weight and vq_dead_code_threshold must be >= 0")
        super().__init__(latent_dim, codebook_size)
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=latent_dim, codebook_size=codebook_size, decay=decay,
                                 commitment_weight=commitment_weight,
                                 threshold_ema_dead_code=dead_code_threshold, accept_image_fmap=True)

    def settings(self):
        return f"K={self.codebook_size}"

    def forward(self, z, seed=None):
        z_q, indices, commit = self.vq(z.float())  # (B, C, H, W), (B, H, W), scalar
        return QuantizerOutput(z_q.to(z.dtype), indices.long(), commit.reshape(()), self.code_bits(z))

    def codes(self, indices):
        return self.vq.get_output_from_indices(indices)  # (B, C, H, W)


class Identity(Bottleneck):
    """No bottleneck: the distortion floor of this encoder/decoder. Rate: 32-bit floats."""

    rate_label = "float32"

    def settings(self):
        return f"C={self.in_channels}"

    def forward(self, z, seed=None):
        return QuantizerOutput(z, None, _zero(z), _constant_bits(z, 32 * z[0].numel()))


class GaussianBottleneck(Bottleneck):
    """A Gaussian VAE bottleneck (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

    The encoder predicts mean and log-variance (2C channels); training samples z = mu + sigma*eps,
    evaluation uses mu. Rate reported: KL(q(z|x) || N(0, I)) in bits per image, an information
    estimate, not a code length (no indices). aux_loss = kl_weight * KL per latent value (nats).
    """

    rate_label = "KL"

    def __init__(self, latent_dim, kl_weight):
        if not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ConfigError(f"vae_kl_weight must be a number >= 0; got {kl_weight!r}")
        super().__init__(2 * latent_dim)
        self.kl_weight = float(kl_weight)

    def settings(self):
        return f"kl={self.kl_weight:g}"

    def forward(self, z, seed=None):
        mu, logvar = z.float().chunk(2, dim=1)  # (B, C, H, W) each
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)  # nats per latent value
        z_q = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return QuantizerOutput(z_q.to(z.dtype), None, self.kl_weight * kl.mean(), kl.detach().flatten(1).sum(1) / math.log(2))


QUANTIZERS = ("fsq", "ddcl", "vq", "none", "vae")


def implied_latent_dim(args):
    """The latent_dim a quantizer's own settings fix (FSQ: one channel per level), else None."""
    return len(validate_fsq_levels(args["fsq_levels"])) if args["quantizer"] == "fsq" else None


def build_quantizer(args):
    """The one place that maps a quantizer name to a module; `args` is the model_args dict."""
    name = args["quantizer"]
    if name == "fsq":
        return FSQWrapper(args["fsq_levels"])
    if name == "ddcl":
        return DDCL_Bottleneck(args["latent_dim"], args["ddcl_delta"], args["ddcl_comm_weight"])
    if name == "vq":
        return VQWrapper(args["latent_dim"], args["vq_codebook_size"], args["vq_decay"],
                         args["vq_commitment_weight"], args["vq_dead_code_threshold"])
    if name == "none":
        return Identity(args["latent_dim"])
    if name == "vae":
        return GaussianBottleneck(args["latent_dim"], args["vae_kl_weight"])
    raise ConfigError(f"quantizer={name!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
