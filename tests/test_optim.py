"""Muon for the hidden convolution filters, Adam for the rest (discrete_ae/optim.py), and how they are grouped."""
import pytest
import torch

from conftest import resolve
from discrete_ae.errors import ConfigError
from discrete_ae.optim import MuonAdam, build_optimizer, orthogonalize
from models import build_model, model_args_from_config


@pytest.mark.parametrize("shape", [(16, 48), (64, 576), (64, 36), (4, 64)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    update = torch.randn(shape) * 1e-3  # any scale: the iteration normalises first
    result = orthogonalize(update)
    singular = torch.linalg.svdvals(result)
    assert result.shape == shape
    assert 0.65 < singular.min() and singular.max() < 1.25
    assert torch.equal(orthogonalize(torch.zeros(shape)), torch.zeros(shape))  # no 0 / 0


def test_adam_groups_step_like_torch_adam():
    torch.manual_seed(0)
    ours = torch.randn(5, 3, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    mine = MuonAdam([{"params": [ours]}], lr=1e-2, betas=(0.9, 0.95))
    reference = torch.optim.Adam([theirs], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        grad = torch.randn(5, 3)
        for p, opt in ((ours, mine), (theirs, reference)):
            p.grad = grad.clone()
            opt.step()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_muon_groups_move_a_filter_by_its_orthogonalised_momentum():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3)
    before = conv.weight.detach().clone()
    opt = MuonAdam([{"params": [conv.weight], "lr": 0.02, "muon": True}], lr=1e-3)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    # first step: Nesterov momentum is (1 + mu) x the gradient, which orthogonalize's scaling removes
    expected = before - 0.02 * orthogonalize(conv.weight.grad.reshape(16, -1)).view_as(before)
    assert torch.allclose(conv.weight.detach(), expected, atol=1e-6)
    assert opt.state[conv.weight]["momentum_buffer"].equal(conv.weight.grad)
    with pytest.raises(ValueError, match="Muon groups take matrices or convolution filters only"):
        MuonAdam([{"params": [conv.bias], "muon": True}], lr=1e-3)


@pytest.mark.parametrize("optimizer, groups", [("muon", [False, True]), ("adam", [False])])
def test_build_optimizer_gives_the_filters_to_muon_and_the_rest_to_adam(optimizer, groups):
    config = resolve(["--quantizer=ddcl", f"--optimizer={optimizer}"])
    model = build_model(model_args_from_config(config))
    opt = build_optimizer(model, config)
    assert [g.get("muon", False) for g in opt.param_groups] == groups
    convs = [p for part in (model.encoder, model.decoder) for p in part.parameters() if p.dim() == 4]
    if optimizer == "muon":  # every filter but the first (reads pixels) and the last (writes pixels)
        assert [id(p) for p in opt.param_groups[1]["params"]] == [id(p) for p in convs[1:-1]]
        adam = {id(p) for p in opt.param_groups[0]["params"]}
        assert id(model.encoder.net[0].weight) in adam and id(model.decoder.net[-1].weight) in adam
        assert opt.param_groups[1]["lr"] == config["muon_lr"] and opt.param_groups[0]["lr"] == config["lr"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("args, message", [
    (["--optimizer=sgd"], "optimizer='sgd'; choose one of muon, adam"),
    (["--muon_lr=0.0"], "muon_lr=0.0 must be a finite number > 0"),
    (["--muon_lr=1e999"], "muon_lr=inf must be a finite number > 0"),
    (["--muon_lr=fast"], "--muon_lr=fast: not a Python literal; expected float like 0.02"),
])
def test_bad_optimizer_knobs_are_one_clear_line(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(args)
