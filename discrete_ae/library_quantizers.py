"""The other discrete bottlenecks of vector-quantize-pytorch, and two continuous references.

Each wraps the library's module, not a re-implementation, behind bottleneck.CodebookBottleneck.
What the wrappers must get right (docs/bottlenecks.md has the details, checked on 1.32):
- channel-first latents (B, C, H, W): VectorQuantize needs accept_image_fmap=True; LFQ detects
  4-D input; FSP, SimVQ and ResidualFSQ default to channel-last and would read a (B, 4, 4, 4)
  latent's width as its channels without an error, so they get channel_first=True;
- no projections: the encoder emits exactly the dimension each quantizer codes (len(levels) for
  FSP and ResidualFSQ, log2(codebook_size) for LFQ), so the library adds no Linear layers;
- quantization runs in float32 with autocast off (bottleneck.CodebookBottleneck.forward).
"""
import math

import torch

from discrete_ae.bottleneck import Bottleneck, CodebookBottleneck, QuantizerOutput, constant_bits, zero
from discrete_ae.errors import ConfigError

VQ_DECAY = 0.99  # EMA decay of the codebook (van den Oord et al. 2017, appendix)
VQ_COMMITMENT_WEIGHT = 0.25  # the paper's beta
VQ_DEAD_CODE_THRESHOLD = 1  # re-seed codes used less than once per batch on average (docs/recipe.md)


def lfq_bits(codebook_size):
    """LFQ's latent channels: one bit each, so codebook_size must be a power of 2."""
    size = _check_codebook_size(codebook_size, "lfq")
    if size & (size - 1):
        raise ConfigError(f"quantizer=lfq needs codebook_size a power of 2 >= 2 (latent_dim = log2 of it); got {size!r}")
    return size.bit_length() - 1


def _check_codebook_size(size, name):
    if not isinstance(size, int) or isinstance(size, bool) or size < 2:
        raise ConfigError(f"codebook_size must be an integer >= 2 for quantizer={name}; got {size!r}")
    return size


class VQWrapper(CodebookBottleneck):
    """Vector quantization with an EMA codebook through `vector_quantize_pytorch.VectorQuantize`.

    van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017.
    Each latent position (a C-vector) maps to one of `codebook_size` codes; the auxiliary loss is
    the commitment loss; dead codes are re-seeded from the batch by the library."""

    def __init__(self, latent_dim, codebook_size, entropy_model="fitted", rate_weight=0.0):
        super().__init__(latent_dim, _check_codebook_size(codebook_size, "vq"), entropy_model, rate_weight)
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=latent_dim, codebook_size=codebook_size, decay=VQ_DECAY,
                                 commitment_weight=VQ_COMMITMENT_WEIGHT, threshold_ema_dead_code=VQ_DEAD_CODE_THRESHOLD,
                                 accept_image_fmap=True)

    def settings(self):
        return f"K={self.codebook_size}" + self.prior_label()

    def quantize(self, z):
        return self.vq(z)  # (B, C, H, W), (B, H, W), commitment loss

    def codes(self, indices):
        return self.vq.get_output_from_indices(indices)  # (B, C, H, W)


class LFQWrapper(CodebookBottleneck):
    """Lookup-free quantization through `vector_quantize_pytorch.LFQ` (MAGVIT-v2: Yu et al.,
    "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation", ICLR 2024, section 3.1).

    Each of the log2(codebook_size) latent channels is one bit, its sign; a position's code is
    those bits (channel 0 the most significant). The auxiliary loss is the library's entropy
    penalty (weight 0.1): low entropy per position, high entropy of the batch's code use."""

    def __init__(self, codebook_size, entropy_model="fitted", rate_weight=0.0):
        super().__init__(lfq_bits(codebook_size), codebook_size, entropy_model, rate_weight)
        from vector_quantize_pytorch import LFQ

        self.lfq = LFQ(codebook_size=codebook_size, channel_first=True)  # dim = log2(codebook_size): no projection

    def settings(self):
        return f"K=2^{self.in_channels}" + self.prior_label()

    def quantize(self, z):
        return self.lfq(z)  # (B, C, H, W) in {-1, 1}, (B, H, W), entropy aux loss (0 in eval mode)

    def codes(self, indices):
        return self.lfq.indices_to_codes(indices)  # (B, C, H, W)


class FSPWrapper(CodebookBottleneck):
    """Finite scalar perturbation through `vector_quantize_pytorch.FSP` (VP-VAE, arXiv 2602.17133).

    Each channel goes through a CDF activation (tanh) onto [0, 1], split into levels[i] bins.
    Training replaces every value by a uniform perturbation within half a bin of it (the library's
    quantize_rate 0: bounded noise, as DDCL adds); evaluation sends the bin and decodes its centre.
    The auxiliary loss is the library's batch-statistics regulariser ("var_tanh")."""

    noise_in_training = True

    def __init__(self, levels, entropy_model="fitted", rate_weight=0.0):
        super().__init__(len(levels), math.prod(levels), entropy_model, rate_weight)
        from vector_quantize_pytorch import FSP

        self.fsp = FSP(levels=levels, channel_first=True)
        self.levels = levels

    def settings(self):
        return f"levels={self.levels}" + self.prior_label()

    def quantize(self, z):
        z_q, indices, norm_loss, _ = self.fsp(z)  # (B, C, H, W), (B, H, W), scalar, statistics
        return z_q, indices, norm_loss

    def codes(self, indices):
        return self.fsp.indices_to_codes(indices)  # (B, C, H, W) bin centres


class SimVQWrapper(CodebookBottleneck):
    """SimVQ through `vector_quantize_pytorch.SimVQ` (Zhu et al., "Addressing Representation
    Collapse in Vector Quantized Models with One Linear Layer", 2024): a frozen random codebook
    times one learned linear map, so every code moves with each update; rotation-trick gradients
    (Fifty et al. 2024) and the library's commitment loss."""

    def __init__(self, latent_dim, codebook_size, entropy_model="fitted", rate_weight=0.0):
        super().__init__(latent_dim, _check_codebook_size(codebook_size, "simvq"), entropy_model, rate_weight)
        from vector_quantize_pytorch import SimVQ

        self.simvq = SimVQ(dim=latent_dim, codebook_size=codebook_size, channel_first=True)

    def settings(self):
        return f"K={self.codebook_size}" + self.prior_label()

    def quantize(self, z):
        return self.simvq(z)  # (B, C, H, W), (B, H, W), commitment loss

    def codes(self, indices):
        return self.simvq.indices_to_codes(indices)  # (B, C, H, W)


class ResidualFSQWrapper(CodebookBottleneck):
    """Residual FSQ through `vector_quantize_pytorch.ResidualFSQ` (Mentzer et al. 2024's FSQ in
    stages, as residual VQ in Zeghidour et al., "SoundStream", 2021, algorithm 1): stage q codes
    what the stages before it left, at a scale of levels^-q; the codes add up. One stream of
    prod(levels) codes per stage, so the rate adds up over `num_quantizers`."""

    def __init__(self, levels, num_quantizers, entropy_model="fitted", rate_weight=0.0):
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
            raise ConfigError(f"num_quantizers must be an integer >= 1 (stages of residual FSQ); got {num_quantizers!r}")
        super().__init__(len(levels), math.prod(levels), entropy_model, rate_weight, num_streams=num_quantizers)
        from vector_quantize_pytorch import ResidualFSQ

        self.rfsq = ResidualFSQ(levels=levels, num_quantizers=num_quantizers, is_channel_first=True)
        self.levels = levels

    def settings(self):
        return f"levels={self.levels} x{self.num_streams}" + self.prior_label()

    def quantize(self, z):
        z_q, indices = self.rfsq(z)  # (B, C, H, W), (B, Q, H, W)
        return z_q, indices, zero(z)

    def codes(self, indices):
        out = self.rfsq.get_output_from_indices(indices.permute(0, 2, 3, 1))  # takes (B, H, W, Q) -> (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()


class Identity(Bottleneck):
    """No bottleneck: the distortion floor of this encoder/decoder. Rate: 32-bit floats."""

    rate_label = "float32"

    def settings(self):
        return f"C={self.in_channels}"

    def forward(self, z, seed=None):
        return QuantizerOutput(z, None, zero(z), constant_bits(z, 32 * z[0].numel()), zero(z))


class GaussianBottleneck(Bottleneck):
    """A Gaussian VAE bottleneck (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

    The encoder predicts mean and log-variance (2C channels); training samples z = mu + sigma*eps,
    evaluation uses mu. Rate reported: KL(q(z|x) || N(0, I)) in bits per image, an information
    estimate, not a code length (no indices). aux_loss = kl_weight * KL per latent value (nats)."""

    rate_label = "KL"

    def __init__(self, latent_dim, kl_weight, entropy_model="fitted", rate_weight=0.0):
        if not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ConfigError(f"vae_kl_weight must be a number >= 0; got {kl_weight!r}")
        super().__init__(2 * latent_dim, entropy_model, rate_weight)
        self.kl_weight = float(kl_weight)

    def settings(self):
        return f"kl={self.kl_weight:g}"

    def forward(self, z, seed=None):
        mu, logvar = z.float().chunk(2, dim=1)  # (B, C, H, W) each
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)  # nats per latent value
        z_q = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return QuantizerOutput(z_q.to(z.dtype), None, self.kl_weight * kl.mean(),
                               kl.detach().flatten(1).sum(1) / math.log(2), zero(z))

