"""The optimizer and the learning-rate schedule of train.py.

`MuonAdam`: Muon for weight matrices and convolution filters, Adam for every other parameter, as
one torch optimizer; `build_optimizer` gives Muon the hidden filters of the encoder and decoder.

Muon (K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/) is SGD with Nesterov momentum whose update of each
weight matrix is replaced by the nearest semi-orthogonal matrix, U V^T of the update's SVD,
approximated by five Newton-Schulz iterations. Every direction of the matrix then moves by the same
amount, which the paper finds trains hidden layers in fewer steps than Adam; biases and other
non-matrix parameters stay with Adam (Kingma & Ba, ICLR 2015). A convolution filter is the matrix
(rows, fan) of its flattened weight: (out, in * k * k) for Conv2d and (in, out * k * k) for
ConvTranspose2d (orthogonalising a matrix or its transpose is the same map).
Why Muon and these rates: docs/recipe.md.
"""
import math

import torch

# The quintic iteration X <- a X + b (X X^T) X + c (X X^T)^2 X of the paper: in five steps it
# takes the singular values of a matrix scaled to spectral norm <= 1 into about [0.7, 1.2], all
# but those far below the largest (measured: down to 1e-2 of it for a 64 x 576 matrix), which stay smaller.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5
NORM_EPS = 1e-7  # keeps an all-zero update finite
BETAS = (0.9, 0.999)  # Adam's moment decays (torch's defaults)
WARMUP_EPOCHS = 0.25  # linear warmup of every learning rate from ~0 to its peak
PRIOR_LR_SCALE = 10.0  # a learned prior's peak lr is this times `lr`, so it keeps up with the encoder


def orthogonalize(update):
    """(rows, cols) -> (rows, cols): the update with its singular values pushed near 1 (Newton-Schulz)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = update / (update.norm() + NORM_EPS)  # Frobenius norm >= spectral norm: starts inside the basin
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T  # iterate on the (small, small) Gram matrix
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class MuonAdam(torch.optim.Optimizer):
    """Param groups with "muon": True take Muon steps (lr, momentum, Nesterov); the others Adam
    steps (lr, betas, eps). One optimizer, so one LR scheduler scales both and one state_dict
    goes into a checkpoint."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, momentum=0.95):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, muon=False))
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices or convolution filters only (dim >= 2)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adam)(p, self.state[p], group)
        return loss

    @staticmethod
    def _muon(p, state, group):
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.mul_(mu).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=mu)
        matrix = nesterov.reshape(len(nesterov), -1)  # (rows, fan)
        rows, fan = matrix.shape
        # the rows of a tall semi-orthogonal matrix are shorter than 1: the paper's scale restores them
        scale = max(1.0, rows / fan) ** 0.5
        p.add_(orthogonalize(matrix.float()).view(p.shape).to(p.dtype), alpha=-group["lr"] * scale)

    @staticmethod
    def _adam(p, state, group):
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        (beta1, beta2), t = group["betas"], state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def build_optimizer(model, config):
    """The optimizer of a training run. Parameter groups, in this order (a checkpoint's optimizer
    state follows it): the model's parameters at `lr` (Adam); with optimizer="muon" the hidden
    convolution filters of the encoder and decoder at `muon_lr` (Muon) instead, the first (reads
    pixels) and the last (writes them) staying with Adam as the paper advises; a learned prior's
    parameters at PRIOR_LR_SCALE x lr (Adam)."""
    muon = config["optimizer"] == "muon"
    convs = [p for part in (model.encoder, model.decoder) for p in part.parameters() if p.dim() == 4]
    filters = convs[1:-1] if muon else []
    taken = {id(p) for p in filters}
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not n.startswith("quantizer.prior.") and id(p) not in taken]}]
    if filters:
        groups.append({"params": filters, "muon": True})
    if model.quantizer.prior is not None:
        groups.append({"params": list(model.quantizer.prior.parameters()), "prior": True})
    for group in groups:
        group["lr"] = peak_lr(group, config)
    return (MuonAdam if muon else torch.optim.Adam)(groups, lr=config["lr"], betas=BETAS)


def peak_lr(group, config):
    if group.get("muon"):
        return config["muon_lr"]
    return config["lr"] * (PRIOR_LR_SCALE if group.get("prior") else 1.0)


def lr_factor(step, total_steps, warmup_steps):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then a half cosine to 0 at the last step (Loshchilov & Hutter, "SGDR", ICLR
    2017, without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, epochs, steps_per_epoch):
    """Per-step LambdaLR over `epochs` x `steps_per_epoch` steps. Its state (the step count) goes
    into every checkpoint, so a resumed run continues the same curve; resuming with another
    `epochs` re-plans the rest of the decay towards the new end."""
    total, warmup = epochs * steps_per_epoch, round(WARMUP_EPOCHS * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def restore(optimizer, scheduler, state, config):
    """Load a checkpoint's optimizer and schedule state, then set every group's peak from `config`:
    a --lr or --muon_lr given with --resume applies from the next step (the loaded state carries
    the old peaks)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = [peak_lr(group, config) for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
