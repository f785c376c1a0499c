"""What every bottleneck tells the rest of the repo, said once.

A bottleneck takes the encoder's latent z (B, C, H, W) and returns the same small named result,
`QuantizerOutput`, so that training, evaluation and plots never branch on its name:

    z_q        (B, C, H, W) float   what the decoder sees
    indices    integer tensor or None: the symbols a sender transmits
               one code per position: (B, H, W) in [0, codebook_size); residual: (B, Q, H, W);
               DDCL: (B, C, H, W), one signed integer per latent value
    aux_loss   scalar tensor, already weighted, added to the reconstruction loss
    bits       (B,) float, the bottleneck's own estimate of bits per image (detached): a
               fixed-length code, DDCL's surrogate, 32-bit floats, a KL, or with a learned prior
               -log2 p(indices) under it
    prior_loss scalar tensor: trains the learned prior alone (0 without one); only the prior's
               parameters receive its gradient

The rate the indices really cost is measured by evaluate.py through discrete_ae/coding.py: a bottleneck only
describes its integers to the coder, `coding_values` (which integers, in which streams) and
`coding_tables` (their probabilities under the fitted or the learned prior).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from discrete_ae.errors import CheckpointError, ConfigError
from discrete_ae.geometry import LATENT_HW, PIXELS_PER_IMAGE
from discrete_ae.priors import CategoricalPrior, ContextCodePrior, priors_from_state, priors_to_state

ENTROPY_MODELS = ("fitted", "learned", "context")
NO_PRIOR = ("this model holds no fitted rate prior (it was never evaluated); fit one in Python with "
            "evaluate.fit_rate_prior(model, train_images), or store one in the checkpoint with "
            "python evaluate.py CHECKPOINT --save_prior=True")


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor
    indices: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    bits: torch.Tensor
    prior_loss: torch.Tensor


def zero(z):
    return z.new_zeros((), dtype=torch.float32)


def constant_bits(z, bits_per_image):
    return torch.full((z.shape[0],), float(bits_per_image), device=z.device)


def by_position(prior):
    """A context prior's coder sends (B, H*W, C): one group per position, in the prior's coding
    order (priors.coding_order), so the decoder has a value's context before it."""
    return getattr(prior, "sequential", False)


def to_coding_order(values, prior):
    """(B, G, n) groups in raster order -> the order `prior` codes them in."""
    return values[:, torch.as_tensor(prior.order)]


def from_coding_order(values, prior):
    """The inverse of to_coding_order."""
    out = torch.empty_like(values)
    out[:, torch.as_tensor(prior.order)] = values
    return out


class Bottleneck(nn.Module):
    """The interface. in_channels: what the encoder emits; codebook_size: the index alphabet per
    stream (None when unbounded or without indices); num_streams: independent index streams of
    the fitted prior; rate_label: what `bits` is when nothing was measured; fitted_prior: the
    entropy model evaluate.py fits, kept in the state_dict (extra state) so a loaded checkpoint
    compresses on its own; prior: the learned prior module, or None."""

    codebook_size = None
    num_streams = 0
    rate_label = "estimate"
    has_indices = False
    has_context_prior = False  # entropy_model="context" is implemented
    noise_in_training = False  # training draws noise, so its rate differs from evaluation's

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

    def indices(self, z, seed=0):
        """forward(z, seed).indices without the rate (what an encoder sends; the codec's hot path)."""
        return self(z, seed=seed).indices

    def fixed_length_bits(self, indices):
        raise TypeError(f"{type(self).__name__} has no indices")

    def learned_rate(self, encoder_bits, prior_bits):
        """(aux_loss, bits per image, prior_loss) from per-value bits (B, S, P) under the learned prior."""
        per_image = encoder_bits.flatten(1).sum(1)  # (B,)
        return self.rate_weight * per_image.mean() / PIXELS_PER_IMAGE, per_image.detach(), prior_bits.mean()

    def coding_values(self, indices):
        """indices -> (B, G, P) integers in G streams of P positions."""
        return indices.reshape(indices.shape[0], self.num_streams, -1)

    def indices_from_values(self, values, latent_hw):
        raise NotImplementedError

    def coding_tables(self, batch, positions, seed, fitted=None):
        """The coding.Table of each stream for `batch` images of `positions` latent positions;
        `seed` is the dither seed (DDCL's learned prior conditions on the dither); `fitted`, a fitted
        prior to use instead of the stored one (evaluation scores without storing)."""
        if self.prior is not None:
            return self.learned_tables(batch, positions, seed)
        fitted = self.fitted_prior if fitted is None else fitted
        if fitted is None:
            raise CheckpointError(NO_PRIOR)
        return [p.table(positions) for p in fitted]

    def get_extra_state(self):
        return {"fitted_prior": priors_to_state(self.fitted_prior)}

    def set_extra_state(self, state):
        self.fitted_prior = priors_from_state(state["fitted_prior"])


def validate_entropy_model(entropy_model, rate_weight, bottleneck):
    if entropy_model not in ENTROPY_MODELS:
        raise ConfigError(f"entropy_model={entropy_model!r}; choose one of {', '.join(ENTROPY_MODELS)}")
    if entropy_model != "fitted" and not bottleneck.has_indices:
        raise ConfigError(f"entropy_model={entropy_model!r} needs a bottleneck that sends integers; "
                          f"{type(bottleneck).__name__} sends none: use entropy_model='fitted'")
    if entropy_model == "context" and not bottleneck.has_context_prior:
        raise ConfigError(f"entropy_model='context' is implemented for the bottlenecks that send integers; "
                          f"{type(bottleneck).__name__} can use entropy_model='learned' or 'fitted'")
    if not isinstance(rate_weight, (int, float)) or isinstance(rate_weight, bool) or not math.isfinite(rate_weight) or rate_weight < 0:
        raise ConfigError(f"rate_weight must be a finite number >= 0 (loss per bit per pixel), e.g. 0.01; got {rate_weight!r}")
    return entropy_model, float(rate_weight)


class CodebookBottleneck(Bottleneck):
    """A bottleneck that sends `num_streams` codes in [0, codebook_size) per latent position (FSQ,
    VQ, LFQ, FSP, SimVQ; a residual quantizer has one stream per stage). A subclass says how to
    quantize, `quantize(z) -> (z_q, indices, aux_loss)`, and how indices map back, `codes(indices)`.

    Learned prior: a categorical over the codes of each stream, shared by the positions. The
    nearest-code choice has no gradient, so the rate trains this prior but does not move the
    encoder (FSQWrapper gives its per-channel levels a straight-through gradient instead)."""

    rate_label = "fixed-length"
    has_indices = True
    has_context_prior = True

    def __init__(self, in_channels, codebook_size, entropy_model="fitted", rate_weight=0.0, num_streams=1, priors=None):
        """priors: {"learned": make, "context": make} where a subclass models its codes otherwise
        (FSQ: per channel over its levels)."""
        super().__init__(in_channels, entropy_model, rate_weight)
        self.codebook_size, self.num_streams = codebook_size, num_streams
        makers = {"learned": lambda: CategoricalPrior([codebook_size] * num_streams),
                  "context": lambda: ContextCodePrior(num_streams, codebook_size, LATENT_HW), **(priors or {})}
        if self.entropy_model in makers:
            self.prior = makers[self.entropy_model]()

    def quantize(self, z):
        raise NotImplementedError

    def codes(self, indices):
        raise NotImplementedError

    def _quantized(self, z):
        # z: (B, C, H, W). Quantized in float32 with autocast off: the libraries force fp32 only
        # under CUDA autocast, and a bf16 latent would round the decision boundaries
        with torch.autocast(z.device.type, enabled=False):
            z_q, indices, aux = self.quantize(z.float())
        return z_q, indices.long(), aux.float().reshape(())

    def indices(self, z, seed=None):
        return self._quantized(z)[1]

    def forward(self, z, seed=None):
        z_q, indices, aux = self._quantized(z)
        if self.prior is None:
            bits = _latent_positions(z) * self.num_streams * math.log2(self.codebook_size)
            return QuantizerOutput(z_q, indices, aux, constant_bits(z, bits), zero(z))
        rate_aux, bits, prior_loss = self.learned_rate(*self.prior.bits(self.learned_symbols(z_q, indices)))
        return QuantizerOutput(z_q, indices, aux + rate_aux, bits, prior_loss)

    def learned_symbols(self, z_q, indices):
        """The symbols (B, S, P) the learned prior scores; here the codes, no gradient (as floats for
        the factorized prior, as integers for the context prior's embeddings)."""
        codes = indices.reshape(indices.shape[0], self.num_streams, -1)
        return codes if by_position(self.prior) else codes.float()

    def coding_values(self, indices):
        """indices -> (B, G, P): one stream per residual stage, each over the positions; under the
        context prior one code per group, (B, P S, 1), position by position, stage by stage, in
        the prior's coding order."""
        codes = indices.reshape(indices.shape[0], self.num_streams, -1)  # (B, S, P)
        if by_position(self.prior):
            return to_coding_order(codes.transpose(1, 2).reshape(len(codes), -1, 1), self.prior)
        return codes

    def index_shape(self, latent_hw):
        return tuple(latent_hw) if self.num_streams == 1 else (self.num_streams, *latent_hw)

    def indices_from_values(self, values, latent_hw):
        if by_position(self.prior):  # (B, P S, 1) -> (B, S, P)
            values = from_coding_order(values, self.prior).reshape(len(values), -1, self.num_streams).transpose(1, 2)
        return values.reshape(values.shape[0], *self.index_shape(latent_hw)).contiguous()

    def learned_tables(self, batch, positions, seed):
        return self.prior.tables(positions)

    def fixed_length_bits(self, indices):
        """A plain code: log2(codebook_size) bits per code sent."""
        return indices[0].numel() * math.log2(self.codebook_size)

    def decode_indices(self, indices, seed=None):
        check_index_range(indices, self.codebook_size)
        return self.codes(indices)


def _latent_positions(z):
    return z.shape[-2] * z.shape[-1]


def check_index_range(indices, codebook_size):
    """Codes must lie in [0, codebook_size): out-of-range codes were reported upstream."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(f"indices outside [0, {codebook_size}): min {int(indices.min())}, max {int(indices.max())}")
