"""The root shows the design (the original four files, config, the programs); the machinery is the
discrete_ae package, which never imports the root; scoring a model does not change it."""
import ast
import glob
import os

import pytest
import torch

from conftest import REPO
from discrete_ae import coding
from discrete_ae.data import load_dataset
from evaluate import evaluate
from utils import load_checkpoint

ROOT_FILES = {"train.py", "models.py", "quantizers.py", "utils.py", "config.py", "evaluate.py", "codec.py", "bench.py"}


def imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_the_root_holds_the_design_and_the_programs_only():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "*.py"))} == ROOT_FILES


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "discrete_ae", "*.py"))), ids=os.path.basename)
def test_the_package_never_imports_the_root(path):
    root_modules = {name[:-3] for name in ROOT_FILES}
    assert not set(imported_modules(path)) & root_modules


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "scripts", "*.py"))), ids=os.path.basename)
def test_scripts_do_not_edit_sys_path(path):
    assert "sys.path" not in open(path, encoding="utf-8").read()


@pytest.mark.parametrize("store", [False, True])
def test_scoring_leaves_the_model_as_it_was_unless_asked_to_store_the_prior(run_train, tmp_path, store):
    config, _ = run_train(quantizer="fsq", fsq_levels=[5, 4, 4])
    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_best.pt"))
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    model.quantizer.fitted_prior = None  # as a model that was never scored
    before = coding.fingerprint(model)
    metrics = evaluate(model, val_u8, train_u8, store_prior=store)
    assert metrics["rate_source"] == "bitstream"
    assert (coding.fingerprint(model) != before) == store
    assert (model.quantizer.fitted_prior is not None) == store
    if store:  # the stored prior is the one the rate was measured under
        x = val_u8[:3].float() / 255
        assert torch.equal(model.decompress(model.compress(x)), model.decode(model.encode(x)))
