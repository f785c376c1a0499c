"""The bottlenecks this repo compares: FSQ and DDCL here, the library's others in
discrete_ae/library_quantizers.py, all behind the interface of discrete_ae/bottleneck.py; `build_quantizer` is the one
place that maps a name to a module.
"""
import math
import operator

import torch

from discrete_ae.bottleneck import (
    Bottleneck,
    CodebookBottleneck,
    QuantizerOutput,
    by_position,
    check_index_range,
    from_coding_order,
    to_coding_order,
    zero,
)
from discrete_ae.errors import ConfigError
from discrete_ae.geometry import LATENT_HW
from discrete_ae.library_quantizers import (
    FSPWrapper,
    GaussianBottleneck,
    Identity,
    LFQWrapper,
    ResidualFSQWrapper,
    SimVQWrapper,
    VQWrapper,
    lfq_bits,
)
from discrete_ae.priors import CategoricalPrior, ContextCategoricalPrior, ContextMixturePrior, LogisticMixturePrior

__all__ = ["FSQWrapper", "DDCL_Bottleneck", "QUANTIZERS", "build_quantizer", "implied_latent_dim",
           "QuantizerOutput", "check_index_range"]


class FSQWrapper(CodebookBottleneck):
    """Finite Scalar Quantization through `vector_quantize_pytorch.FSQ`.

    Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization: VQ-VAE Made Simple",
    ICLR 2024 (arXiv 2309.15505). Channel i is bounded and rounded to levels[i] values; the
    implicit codebook has prod(levels) codes. The encoder emits exactly len(levels) channels, so
    the library adds no projections (its `dim` equals len(levels)).

    Learned prior: a categorical per channel over its levels, shared by the positions; the level
    ids are the library's codes scaled back, (code + 1) * (L // 2), which carry its straight-through
    gradient, so the rate reaches the encoder. Context prior: the same categoricals predicted for
    each position from the levels sent before it, sent position by position.
    """

    def __init__(self, levels, entropy_model="fitted", rate_weight=0.0):
        levels = validate_levels(levels, "fsq_levels")
        super().__init__(len(levels), math.prod(levels), entropy_model, rate_weight,
                         priors={"learned": lambda: CategoricalPrior(levels),
                                 "context": lambda: ContextCategoricalPrior(levels, LATENT_HW)})
        from vector_quantize_pytorch import FSQ

        self.fsq = FSQ(levels=levels)
        self.levels = levels
        self.register_buffer("half_levels", torch.tensor([l // 2 for l in levels], dtype=torch.float32)[:, None],
                             persistent=False)  # (C, 1)

    def settings(self):
        return f"levels={self.levels}" + self.prior_label()

    def quantize(self, z):
        z_q, indices = self.fsq(z)  # (B, C, H, W) codes in [-1, 1]; (B, H, W); 4-D input is channel-first
        return z_q, indices, zero(z)

    def learned_symbols(self, z_q, indices):
        return z_q.flatten(2) * self.half_levels + self.half_levels  # (B, C, H*W) level ids, exact, straight-through

    def codes(self, indices):
        return self.fsq.indices_to_codes(indices)  # (B, C, H, W)

    def coding_values(self, indices):
        """Fitted prior: the code itself (B, 1, H*W); learned prior: each channel's level id
        (B, C, H*W), the symbols its per-channel categoricals model; context: (B, H*W, C)."""
        if self.prior is None:
            return super().coding_values(indices)
        flat = indices.reshape(len(indices), -1)  # (B, P), where the caller holds them (the CPU in evaluate)
        levels = self.fsq.indices_to_level_indices(flat.to(self.half_levels.device)).long().to(flat.device)  # (B, P, C)
        return to_coding_order(levels, self.prior) if by_position(self.prior) else levels.transpose(1, 2)

    def indices_from_values(self, values, latent_hw):
        if self.prior is None:
            return super().indices_from_values(values, latent_hw)
        levels = from_coding_order(values, self.prior) if by_position(self.prior) else values.transpose(1, 2)  # (B, P, C)
        codes = (levels.to(self.half_levels.device).float() - self.half_levels[:, 0]) / self.half_levels[:, 0]  # the library's codes
        return self.fsq.codes_to_indices(codes).reshape(values.shape[0], *latent_hw).long()


def validate_levels(levels, knob):
    if not isinstance(levels, (list, tuple)) or not levels or not all(isinstance(l, int) and not isinstance(l, bool) for l in levels):
        raise ConfigError(f"{knob} must be a non-empty list of integers, e.g. [8, 6, 6, 5]; got {levels!r}")
    if any(l < 3 for l in levels):
        raise ConfigError(f"{knob}={list(levels)}: every level must be >= 3 (FSQ refuses 2 without preserve_symmetry, "
                          "and 0 or 1 carries no information)")
    return list(levels)


class DDCL_Bottleneck(Bottleneck):
    """Differentiable Discrete Communication Learning.

    Freed, Sartoretti, Hu, Choset, "Communication Learning via Backpropagation in Discrete Channels
    with Unknown Noise", AAAI 2020; Kapoor, Bhisikar, Freed, Peters, Sun, "Learning what to say
    and how precisely", arXiv 2511.01554.

    Training: z_tilde = z + u with u ~ U(-delta/2, delta/2), fresh per element; no rounding in the
    graph, so d z_tilde / d z = 1 exactly. The communication cost of one value is
    log2(2|z|/delta + 1) bits; its mean over latent values, times `comm_weight`, is the auxiliary loss.

    Evaluation: real quantization with subtractive dither, mid-tread (Ziv's universal quantization;
    Agustsson & Theis, NeurIPS 2020): m = round((z + u)/delta) are the integers sent and
    z_hat = m*delta - u. Then z_hat - z is uniform on [-delta/2, delta/2] and independent of z, the
    same channel as in training. u comes from a CPU generator seeded with an integer both sides
    know: `seed` is one integer shared by the batch, or one per image (evaluate.py gives image n of
    a split seed n, so every image has its own dither); a receiver regenerates u from the seed
    alone, for any image in any order. Mid-tread (round, not floor) because E|m| = |z|/delta then, so by Jensen
    the surrogate upper-bounds the length of a signed integer code.

    With entropy_model="learned" the surrogate is replaced by a learned density per channel
    (priors.LogisticMixturePrior); with "context" each value's density is predicted from the
    values before it (priors.ContextMixturePrior), and the coder sends the values position by
    position. `ddcl_comm_weight` is then unused; `rate_weight` weighs the bits.
    """

    rate_label = "surrogate"
    has_indices = True
    has_context_prior = True
    noise_in_training = True

    def __init__(self, latent_dim, delta, comm_weight, entropy_model="fitted", rate_weight=0.0):
        super().__init__(latent_dim, entropy_model, rate_weight)
        self.delta = validate_ddcl(delta, comm_weight)
        self.comm_weight = float(comm_weight)
        self.num_streams = latent_dim  # unbounded signed integers, one prior per latent channel
        if self.entropy_model == "learned":
            self.prior = LogisticMixturePrior(latent_dim)
        elif self.entropy_model == "context":
            self.prior = ContextMixturePrior(latent_dim, LATENT_HW)

    def settings(self):
        weight = "" if self.prior is not None else f" w={self.comm_weight:g}"
        return f"delta={self.delta:.4g}{weight}" + self.prior_label()

    def dither(self, shape, seed, device):
        """u ~ U(-delta/2, delta/2) for one image's latent `shape` (C, H, W), reproducible anywhere:
        an integer seed gives (C, H, W), shared by a batch; B seeds give (B, C, H, W), one per image."""
        seeds, per_image = image_seeds(seed)
        u = torch.stack([torch.rand(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
        return ((u if per_image else u[0]) - 0.5).mul_(self.delta).to(device)

    def comm_bits(self, z):
        """log2(2|z|/delta + 1) per latent value, (B, C, H, W). Keep the factor 2 (see the notes)."""
        return torch.log2(2.0 * z.abs() / self.delta + 1.0)

    def _dithered(self, z, seed):
        """Evaluation's subtractive dither: z (B, C, H, W) float32 -> (m, z_hat = m delta - u)."""
        u = self.dither(z.shape[1:], seed, z.device)  # (C, H, W) shared, or (B, C, H, W) per image
        if u.dim() == z.dim() and len(u) != len(z):
            raise ConfigError(f"{len(u)} seeds for {len(z)} images: pass one integer, or one seed per image")
        m = torch.round((z + u) / self.delta)
        return m, m * self.delta - u

    def indices(self, z, seed=0):
        return super().indices(z, seed) if self.training else self._dithered(z.float(), seed)[0].long()

    def forward(self, z, seed=0):
        z = z.float()  # (B, C, H, W); fp32 even under bf16 autocast, so the noise is not rounded away
        if self.training:
            z_hat = z + (torch.rand_like(z) - 0.5) * self.delta
            m = torch.round(z_hat.detach() / self.delta)  # what the dithered quantizer would send
        else:
            m, z_hat = self._dithered(z, seed)
        if self.prior is not None:  # bits of z_hat's delta-wide bin; the exact code length at evaluation
            return QuantizerOutput(z_hat, m.long(), *self.learned_rate(*self.prior.bits(z_hat.flatten(2), self.delta)))
        cost = self.comm_bits(z)  # (B, C, H, W) bits per value
        return QuantizerOutput(z_hat, m.long(), self.comm_weight * cost.mean(), cost.detach().flatten(1).sum(1), zero(z))

    def decode_indices(self, indices, seed=0):
        return indices.float() * self.delta - self.dither(indices.shape[1:], seed, indices.device)

    def coding_values(self, indices):
        """(B, C, H, W) -> (B, C, H*W), one stream per channel; under the context prior (B, H*W, C)."""
        values = indices.flatten(2)
        return to_coding_order(values.transpose(1, 2), self.prior) if by_position(self.prior) else values

    def indices_from_values(self, values, latent_hw):
        values = from_coding_order(values, self.prior).transpose(1, 2) if by_position(self.prior) else values
        # contiguous, as encode returns them: the decoder's convolutions may sum in another order
        # for another memory layout, and decompress must equal decode(encode(x)) bit for bit
        return values.reshape(*values.shape[:2], *latent_hw).contiguous()

    def learned_tables(self, batch, positions, seed):
        """P(m | u) for the dither u that `forward(z, seed)` draws (under the context prior:
        coding.SequentialTables, P(m | u, earlier positions)): one row shared by the batch for an
        integer seed, one per image for a seed per image."""
        u = self.dither((self.in_channels, positions), seed, "cpu")
        return self.prior.tables(u if u.dim() == 3 else u[None], self.delta)

    def fixed_length_bits(self, indices):
        """The naive code: every value gets ceil(log2(number of distinct values seen)) bits."""
        distinct = torch.unique(indices).numel()
        return indices[0].numel() * (math.ceil(math.log2(distinct)) if distinct > 1 else 0)


SEED_RANGE = (-2**63, 2**63)  # seeds are sent as signed 64-bit integers (models.QuantizedVAE.stream_keys)


def image_seeds(seed):
    """(list of int seeds, whether there is one per image) from an int or a sequence/tensor of ints;
    one ConfigError line for anything else or a seed outside signed 64 bits."""
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist() if not seed.is_floating_point() else [None]
    per_image = isinstance(seed, (list, tuple))
    values = list(seed) if per_image else [seed]
    seeds = [operator.index(s) for s in values if not isinstance(s, bool) and hasattr(s, "__index__")]
    if len(seeds) != len(values) or any(not SEED_RANGE[0] <= s < SEED_RANGE[1] for s in seeds):
        raise ConfigError(f"seed={str(seed)[:60]}: pass one integer in [-2**63, 2**63), or one such integer per image")
    return seeds, per_image


def validate_ddcl(delta, comm_weight):
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not math.isfinite(delta) or delta <= 0:
        raise ConfigError(f"ddcl_delta must be a finite number > 0 (the quantization step), e.g. 1/15; got {delta!r}")
    if not isinstance(comm_weight, (int, float)) or comm_weight < 0:
        raise ConfigError(f"ddcl_comm_weight must be a number >= 0; got {comm_weight!r}")
    return float(delta)


QUANTIZERS = ("fsq", "ddcl", "vq", "lfq", "fsp", "simvq", "rfsq", "none", "vae")


def implied_latent_dim(args):
    """The latent_dim a quantizer's own settings fix (levels: one channel each; LFQ: log2 of the
    codebook, one bit per channel), else None."""
    name = args["quantizer"]
    if name in ("fsq", "fsp", "rfsq"):
        return len(validate_levels(args["fsq_levels"], "fsq_levels"))
    return lfq_bits(args["codebook_size"]) if name == "lfq" else None


def build_quantizer(args):
    """The one place that maps a quantizer name to a module; `args` is the model_args dict."""
    name, levels, size, dim = args["quantizer"], args["fsq_levels"], args["codebook_size"], args["latent_dim"]
    rate = dict(entropy_model=args["entropy_model"], rate_weight=args["rate_weight"])
    builders = {
        "fsq": lambda: FSQWrapper(levels, **rate),
        "ddcl": lambda: DDCL_Bottleneck(dim, args["ddcl_delta"], args["ddcl_comm_weight"], **rate),
        "vq": lambda: VQWrapper(dim, size, **rate),
        "lfq": lambda: LFQWrapper(size, **rate),
        "fsp": lambda: FSPWrapper(validate_levels(levels, "fsq_levels"), **rate),
        "simvq": lambda: SimVQWrapper(dim, size, **rate),
        "rfsq": lambda: ResidualFSQWrapper(validate_levels(levels, "fsq_levels"), args["num_quantizers"], **rate),
        "none": lambda: Identity(dim, **rate),
        "vae": lambda: GaussianBottleneck(dim, args["vae_kl_weight"], **rate),
    }
    if name not in builders:
        raise ConfigError(f"quantizer={name!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
    return builders[name]()
