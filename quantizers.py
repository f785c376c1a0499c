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
             none: 32-bit floats, vae: the KL divergence in bits;
             with entropy_model="learned": -log2 p(indices) under the learned prior
    prior_loss scalar tensor: trains the learned prior alone (mean bits per value, the encoder
             held fixed); 0 without one. Added to the loss unweighted: only the prior's parameters
             receive its gradient, and Adam does not care about their gradient's scale.

The rate the indices cost is measured by evaluate.py with entropy.py: under a prior fitted on the
training split (entropy_model="fitted", stored in the bottleneck's state_dict once evaluated), or
under the learned prior trained with the model ("learned"). A bottleneck only describes its
integers to the coder: `coding_values` (which integers, grouped into streams) and `coding_tables`
(their probabilities).

Choices: fsq, ddcl, vq, none, vae (see `build_quantizer`).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from entropy import (CategoricalPrior, ContextCategoricalPrior, ContextMixturePrior, LogisticMixturePrior, priors_from_state,
                     priors_to_state)
from errors import CheckpointError, ConfigError
from metrics import PIXELS_PER_IMAGE

ENTROPY_MODELS = ("fitted", "learned", "context")
LATENT_HW = (4, 4)  # the latent grid: 32 px after three stride-2 stages
NO_PRIOR = ("this model holds no fitted rate prior (its checkpoint predates stored priors, or it was never evaluated); "
            "fit one in Python with evaluate.fit_rate_prior(model, train_images), or store one in the checkpoint with "
            "python evaluate.py CHECKPOINT --save_prior=True")


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    bits: torch.Tensor
    prior_loss: torch.Tensor


class Bottleneck(nn.Module):
    """What every bottleneck tells the rest of the repo, said once.

    in_channels    channels the encoder must emit
    codebook_size  size of the index alphabet; None when unbounded (DDCL) or without indices
    num_streams    independent index streams of the fitted prior (0 without indices)
    rate_label     what the `bits` of its output are when nothing was measured
    entropy_model  "fitted", "learned" or "context" (see entropy.py); `prior` is the learned prior module
    rate_weight    loss per bit per pixel of the learned bits (loss = MSE + rate_weight * bits / 1024)
    fitted_prior   list of entropy.StreamPrior fitted by evaluate.py, or None; kept in the
                   state_dict (its extra state), so a loaded checkpoint compresses on its own
    """

    codebook_size = None
    num_streams = 0
    rate_label = "estimate"
    has_indices = False
    has_context_prior = False  # entropy_model="context" is implemented (FSQ, DDCL)
    noise_in_training = False  # training mode draws noise, so its rate differs from evaluation's

    def __init__(self, in_channels, entropy_model="fitted", rate_weight=0.0):
        super().__init__()
        self.in_channels = in_channels
        self.entropy_model, self.rate_weight = validate_entropy_model(entropy_model, rate_weight, self)
        self.fitted_prior = None
        self.prior = None
        if self.entropy_model != "fitted":
            self.rate_label = f"{self.entropy_model} prior"

    def settings(self):
        """A short label of the settings that change the rate (shown in tables and plots)."""
        raise NotImplementedError

    def prior_label(self):
        if not self.has_indices:
            return ""
        return f" | {self.entropy_model} prior rw={self.rate_weight:g}" if self.prior is not None else " | fitted prior"

    def decode_indices(self, indices, seed=0):
        raise TypeError(f"{type(self).__name__} has no indices to decode")

    def fixed_length_bits(self, indices):
        raise TypeError(f"{type(self).__name__} has no indices")

    def learned_rate(self, encoder_bits, prior_bits):
        """(aux_loss, bits per image, prior_loss) from per-value bits (B, S, P) under the learned prior."""
        per_image = encoder_bits.flatten(1).sum(1)  # (B,)
        return self.rate_weight * per_image.mean() / PIXELS_PER_IMAGE, per_image.detach(), prior_bits.mean()

    # the coder's view (entropy.py) ------------------------------------------------------------

    def coding_values(self, indices):
        """indices -> (B, G, P) integers in G streams of P positions: the fitted prior's streams."""
        return indices.reshape(indices.shape[0], self.num_streams, -1)

    def indices_from_values(self, values, latent_hw):
        raise NotImplementedError

    def coding_tables(self, batch, positions, seed):
        """The entropy.Table of each stream for `batch` images of `positions` latent positions;
        `seed` is the dither seed of that batch (DDCL's learned prior conditions on the dither)."""
        if self.prior is not None:
            return self.learned_tables(batch, positions, seed)
        if self.fitted_prior is None:
            raise CheckpointError(NO_PRIOR)
        return [p.table(positions) for p in self.fitted_prior]

    def get_extra_state(self):
        return {"fitted_prior": priors_to_state(self.fitted_prior)}

    def set_extra_state(self, state):
        self.fitted_prior = priors_from_state(state.get("fitted_prior", []))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before fitted priors were stored have no extra state: no prior
        state_dict.setdefault(prefix + "_extra_state", {"fitted_prior": []})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def validate_entropy_model(entropy_model, rate_weight, bottleneck):
    if entropy_model not in ENTROPY_MODELS:
        raise ConfigError(f"entropy_model={entropy_model!r}; choose one of {', '.join(ENTROPY_MODELS)}")
    if entropy_model != "fitted" and not bottleneck.has_indices:
        raise ConfigError(f"entropy_model={entropy_model!r} needs a bottleneck that sends integers (fsq, vq, ddcl); "
                          f"{type(bottleneck).__name__} sends none: use entropy_model='fitted'")
    if entropy_model == "context" and not bottleneck.has_context_prior:
        raise ConfigError(f"entropy_model='context' is implemented for fsq and ddcl; {type(bottleneck).__name__} "
                          "can use entropy_model='learned' (a prior without context) or 'fitted'")
    if not isinstance(rate_weight, (int, float)) or isinstance(rate_weight, bool) or not math.isfinite(rate_weight) or rate_weight < 0:
        raise ConfigError(f"rate_weight must be a finite number >= 0 (loss per bit per pixel), e.g. 0.01; got {rate_weight!r}")
    return entropy_model, float(rate_weight)


class CodebookBottleneck(Bottleneck):
    """A bottleneck that sends one code in [0, codebook_size) per latent position (FSQ, VQ)."""

    num_streams = 1  # one code per position, all positions share one prior
    rate_label = "fixed-length"
    has_indices = True

    def __init__(self, in_channels, codebook_size, entropy_model="fitted", rate_weight=0.0):
        super().__init__(in_channels, entropy_model, rate_weight)
        self.codebook_size = codebook_size

    def indices_from_values(self, values, latent_hw):
        return values.reshape(values.shape[0], *latent_hw)

    def learned_tables(self, batch, positions, seed):
        return self.prior.tables(positions)

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
    return z.new_zeros((), dtype=torch.float32)


def _by_position(prior):
    """A context prior's coder sends (B, H*W, C): one group per position, in raster order, so the
    decoder has a value's context before it."""
    return getattr(prior, "sequential", False)


class FSQWrapper(CodebookBottleneck):
    """Finite Scalar Quantization through `vector_quantize_pytorch.FSQ` (no hand-written FSQ).

    Mentzer, Minnen, Agustsson, Tschannen, "Finite Scalar Quantization: VQ-VAE Made Simple",
    ICLR 2024 (arXiv 2309.15505). Channel i is bounded and rounded to levels[i] values; the
    implicit codebook has prod(levels) codes. The encoder emits exactly len(levels) channels, so
    the library adds no projections (its `dim` equals len(levels)).

    Learned prior: a categorical per channel over its levels, shared by the 16 positions. The per-channel level ids are the library's codes scaled back, (code + 1) * (L // 2), which
    carry its straight-through gradient, so the rate reaches the encoder. Context prior
    (entropy_model="context"): the same categoricals predicted for each position from the levels
    sent before it (entropy.ContextCategoricalPrior), sent position by position.
    """

    has_context_prior = True

    def __init__(self, levels, entropy_model="fitted", rate_weight=0.0):
        levels = validate_fsq_levels(levels)
        super().__init__(len(levels), math.prod(levels), entropy_model, rate_weight)
        from vector_quantize_pytorch import FSQ

        try:
            self.fsq = FSQ(levels=levels)
        except AssertionError as err:  # the library refuses some level sets (e.g. a level of 2)
            raise ConfigError(f"fsq_levels={levels} refused by vector_quantize_pytorch.FSQ: {err}") from None
        self.levels = levels
        basis = [math.prod(levels[:i]) for i in range(len(levels))]  # the library's mixed radix
        self.register_buffer("radix", torch.tensor(levels)[:, None], persistent=False)  # (C, 1)
        self.register_buffer("basis", torch.tensor(basis)[:, None], persistent=False)  # (C, 1)
        if self.entropy_model == "learned":
            self.prior = CategoricalPrior(levels)
        elif self.entropy_model == "context":
            self.prior = ContextCategoricalPrior(levels, LATENT_HW)

    def settings(self):
        return f"levels={self.levels}" + self.prior_label()

    def forward(self, z, seed=None):
        # z: (B, C, H, W) with C == len(levels); FSQ treats 4-D input as channel-first.
        z_q, indices = self.fsq(z)  # (B, C, H, W) codes in [-1, 1], (B, H, W)
        if self.prior is None:
            return QuantizerOutput(z_q, indices.long(), _zero(z), self.code_bits(z), _zero(z))
        half = (self.radix // 2).to(torch.float32)[None]  # (1, C, 1)
        level_ids = z_q.float().flatten(2) * half + half  # (B, C, H*W), exact integers, straight-through
        return QuantizerOutput(z_q, indices.long(), *self.learned_rate(*self.prior.bits(level_ids)))

    def coding_values(self, indices):
        """(B, H, W) codes -> fitted prior: the code itself (B, 1, H*W); learned prior: each channel's
        level id (B, C, H*W), the symbols its per-channel categoricals model."""
        flat = indices.reshape(indices.shape[0], 1, -1)  # on the CPU in evaluate, where the model may not be
        if self.prior is None:
            return flat
        levels = (flat // self.basis.to(flat.device)) % self.radix.to(flat.device)  # (B, C, H*W)
        return levels.transpose(1, 2) if _by_position(self.prior) else levels  # context: (B, H*W, C)

    def indices_from_values(self, values, latent_hw):
        if self.prior is None:
            return values[:, 0].reshape(values.shape[0], *latent_hw)
        levels = values.transpose(1, 2) if _by_position(self.prior) else values
        return (levels * self.basis.to(values.device)).sum(1).reshape(values.shape[0], *latent_hw)

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

    With entropy_model="learned" the surrogate is replaced by a learned density per channel
    (entropy.LogisticMixturePrior): training pays -log2 of the prior's mass in the delta-wide bin
    around z + u, evaluation codes m under P(m | u), the same quantity for the dithered latent
    (`ddcl_comm_weight` is then unused; `rate_weight` weighs the bits). With entropy_model="context" the
    density of each value is predicted from the values before it in raster order
    (entropy.ContextMixturePrior), and the coder sends the values position by position.
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
        """u ~ U(-delta/2, delta/2) of `shape`, reproducible from `seed` on any device."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        return ((torch.rand(shape, generator=gen) - 0.5) * self.delta).to(device)

    def comm_bits(self, z):
        """log2(2|z|/delta + 1) per latent value, (B, C, H, W). Keep the factor 2 (see the notes)."""
        return torch.log2(2.0 * z.abs() / self.delta + 1.0)

    def forward(self, z, seed=0):
        z = z.float()  # (B, C, H, W); fp32 even under bf16 autocast, so the noise is not rounded away
        if self.training:
            z_hat = z + (torch.rand_like(z) - 0.5) * self.delta
            m = torch.round(z_hat.detach() / self.delta)
        else:
            u = self.dither(z.shape, seed, z.device)
            m = torch.round((z + u) / self.delta)
            z_hat = m * self.delta - u
        if self.prior is not None:  # bits of z_hat's delta-wide bin; the exact code length at evaluation
            return QuantizerOutput(z_hat, m.long(), *self.learned_rate(*self.prior.bits(z_hat.flatten(2), self.delta)))
        cost = self.comm_bits(z)  # (B, C, H, W) bits per value
        return QuantizerOutput(z_hat, m.long(), self.comm_weight * cost.mean(), cost.detach().flatten(1).sum(1), _zero(z))

    def decode_indices(self, indices, seed=0):
        u = self.dither(indices.shape, seed, indices.device)
        return indices.float() * self.delta - u

    def coding_values(self, indices):
        """(B, C, H, W) -> (B, C, H*W), one stream per channel; under the context prior (B, H*W, C):
        one group per position, sent in raster order, so the decoder has a value's context before it."""
        values = indices.flatten(2)
        return values.transpose(1, 2) if _by_position(self.prior) else values

    def indices_from_values(self, values, latent_hw):
        values = values.transpose(1, 2) if _by_position(self.prior) else values
        # contiguous, as encode returns them: the decoder's convolutions may sum in another order
        # for another memory layout, and decompress must equal decode(encode(x)) bit for bit
        return values.reshape(*values.shape[:2], *latent_hw).contiguous()

    def learned_tables(self, batch, positions, seed):
        """P(m | u) for the dither u that `forward(z, seed)` draws for a batch of this size (under the
        context prior: entropy.SequentialTables, P(m | u, earlier positions))."""
        return self.prior.tables(self.dither((batch, self.in_channels, positions), seed, "cpu"), self.delta)

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

    def __init__(self, latent_dim, codebook_size, decay, commitment_weight, dead_code_threshold,
                 entropy_model="fitted", rate_weight=0.0):
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ConfigError(f"vq_codebook_size must be an integer >= 2; got {codebook_size!r}")
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"vq_decay must be in (0, 1), e.g. 0.99; got {decay!r}")
        if commitment_weight < 0 or dead_code_threshold < 0:
            raise ConfigError("vq_commitment_weight and vq_dead_code_threshold must be >= 0")
        super().__init__(latent_dim, codebook_size, entropy_model, rate_weight)
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=latent_dim, codebook_size=codebook_size, decay=decay,
                                 commitment_weight=commitment_weight,
                                 threshold_ema_dead_code=dead_code_threshold, accept_image_fmap=True)
        if self.entropy_model == "learned":
            # a categorical over the codes; the nearest-code choice has no gradient, so the rate
            # trains this prior but does not move the encoder
            self.prior = CategoricalPrior([codebook_size])

    def settings(self):
        return f"K={self.codebook_size}" + self.prior_label()

    def forward(self, z, seed=None):
        z_q, indices, commit = self.vq(z.float())  # (B, C, H, W), (B, H, W), scalar
        z_q, indices, commit = z_q.to(z.dtype), indices.long(), commit.reshape(())
        if self.prior is None:
            return QuantizerOutput(z_q, indices, commit, self.code_bits(z), _zero(z))
        aux, bits, prior_loss = self.learned_rate(*self.prior.bits(self.coding_values(indices).float()))
        return QuantizerOutput(z_q, indices, commit + aux, bits, prior_loss)

    def codes(self, indices):
        return self.vq.get_output_from_indices(indices)  # (B, C, H, W)


class Identity(Bottleneck):
    """No bottleneck: the distortion floor of this encoder/decoder. Rate: 32-bit floats."""

    rate_label = "float32"

    def settings(self):
        return f"C={self.in_channels}"

    def forward(self, z, seed=None):
        return QuantizerOutput(z, None, _zero(z), _constant_bits(z, 32 * z[0].numel()), _zero(z))


class GaussianBottleneck(Bottleneck):
    """A Gaussian VAE bottleneck (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

    The encoder predicts mean and log-variance (2C channels); training samples z = mu + sigma*eps,
    evaluation uses mu. Rate reported: KL(q(z|x) || N(0, I)) in bits per image, an information
    estimate, not a code length (no indices). aux_loss = kl_weight * KL per latent value (nats).
    """

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
        return QuantizerOutput(z_q.to(z.dtype), None, self.kl_weight * kl.mean(), kl.detach().flatten(1).sum(1) / math.log(2),
                               _zero(z))


QUANTIZERS = ("fsq", "ddcl", "vq", "none", "vae")


def implied_latent_dim(args):
    """The latent_dim a quantizer's own settings fix (FSQ: one channel per level), else None."""
    return len(validate_fsq_levels(args["fsq_levels"])) if args["quantizer"] == "fsq" else None


def build_quantizer(args):
    """The one place that maps a quantizer name to a module; `args` is the model_args dict."""
    name = args["quantizer"]
    rate = dict(entropy_model=args["entropy_model"], rate_weight=args["rate_weight"])
    if name == "fsq":
        return FSQWrapper(args["fsq_levels"], **rate)
    if name == "ddcl":
        return DDCL_Bottleneck(args["latent_dim"], args["ddcl_delta"], args["ddcl_comm_weight"], **rate)
    if name == "vq":
        return VQWrapper(args["latent_dim"], args["vq_codebook_size"], args["vq_decay"],
                         args["vq_commitment_weight"], args["vq_dead_code_threshold"], **rate)
    if name == "none":
        return Identity(args["latent_dim"], **rate)
    if name == "vae":
        return GaussianBottleneck(args["latent_dim"], args["vae_kl_weight"], **rate)
    raise ConfigError(f"quantizer={name!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
