"""--key=value overrides and config checks: bad input stops with one clear line."""
import os

import pytest

import train
from conftest import REPO, run_script
from errors import ConfigError
from utils import parse_overrides

DEFAULTS = dict(lr=3e-4, epochs=50, quantizer="ddcl", fsq_levels=[8, 6, 6, 5], compile=False, channels=[16, 32, 64])


def test_overrides_parse_literals_and_check_types():
    config, given = parse_overrides(["--lr=1e-3", "--epochs=5", "--quantizer=fsq", "--fsq_levels=[8,5,5,5]",
                                     "--compile=True"], DEFAULTS)
    assert config == dict(lr=1e-3, epochs=5, quantizer="fsq", fsq_levels=[8, 5, 5, 5], compile=True, channels=[16, 32, 64])
    assert given == {"lr", "epochs", "quantizer", "fsq_levels", "compile"}


def test_int_is_accepted_where_float_is_expected():
    config, _ = parse_overrides(["--lr=1"], DEFAULTS)
    assert config["lr"] == 1.0 and isinstance(config["lr"], float)


@pytest.mark.parametrize("arg, message", [
    ("--learning_rate=1", "unknown config key 'learning_rate'; allowed keys: lr, epochs"),
    ("--epochs=2.5", "--epochs=2.5: expected int"),
    ("--epochs=True", "--epochs=True: expected int"),
    ("--compile=1", "--compile=1: expected bool"),
    ("--fsq_levels=8", "--fsq_levels=8: expected list"),
    ("--fsq_levels=[8,5.5]", "expected a list of int"),
    ("--lr=fast", "--lr=fast: not a Python literal; expected float"),
    ("--lr", "is not of the form --key=value"),
    ("epochs=3", "is not of the form --key=value"),
])
def test_bad_overrides_name_the_problem(arg, message):
    with pytest.raises(ConfigError, match=None) as err:
        parse_overrides([arg], DEFAULTS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_no_exec_of_override_values():
    with pytest.raises(ConfigError):
        parse_overrides(["--quantizer=__import__('os').system('echo hacked')"], {"quantizer": 1})


@pytest.mark.parametrize("args, message", [
    (["--quantizer=fsq", "--fsq_levels=[8,2,5]"], "every level must be >= 3"),
    (["--quantizer=fsq", "--fsq_levels=[]"], "non-empty list"),
    (["--quantizer=ddcl", "--ddcl_delta=0"], "ddcl_delta must be a finite number > 0"),
    (["--quantizer=ddcl", "--ddcl_delta=-0.1"], "ddcl_delta must be a finite number > 0"),
    (["--batch_size=0"], "batch_size=0 must be > 0"),
    (["--curves_every=-1"], "curves_every=-1 must be >= 0"),
    (["--lr=0"], "lr=0.0 must be a finite number > 0"),
    (["--beta2=1.0"], "beta2=1.0 must be in [0, 1)"),
    (["--beta2=-0.5"], "beta2=-0.5 must be in [0, 1)"),
    (["--color_gain=1.0"], "color_gain=1.0 must be in [0, 1)"),
    (["--color_gain=-0.1"], "color_gain=-0.1 must be in [0, 1)"),
    (["--quantizer=pq"], "quantizer='pq' is unknown"),
    (["--quantizer=fsq", "--latent_dim=6"], "fsq implies latent_dim = 4"),
    (["--channels=[8,8]"], "channels must be three positive integers"),
    (["--amp=fp8"], "amp='fp8'"),
    (["--dataset=imagenet"], "dataset='imagenet' is unknown"),
    (["--quantizer=vq", "--vq_codebook_size=1"], "vq_codebook_size must be an integer >= 2"),
    (["--entropy_model=trained"], "entropy_model='trained'; choose one of fitted, learned, context"),
    (["--quantizer=vq", "--entropy_model=context"], "entropy_model='context' is implemented for fsq and ddcl"),
    (["--quantizer=none", "--entropy_model=context"], "needs a bottleneck that sends integers"),
    (["--quantizer=none", "--entropy_model=learned"], "needs a bottleneck that sends integers"),
    (["--quantizer=vae", "--entropy_model=learned"], "needs a bottleneck that sends integers"),
    (["--entropy_model=learned", "--rate_weight=-0.1"], "rate_weight must be a finite number >= 0"),
    (["--prior_lr_scale=0"], "prior_lr_scale=0.0 must be a finite number > 0"),
])
def test_invalid_settings_are_refused(args, message):
    with pytest.raises(ConfigError) as err:
        train.resolve_config(args)
    assert message in str(err.value)


def test_fsq_latent_dim_follows_levels():
    config = train.resolve_config(["--quantizer=fsq", "--fsq_levels=[7,5,5,5,5]"])
    assert config["latent_dim"] == 5


def test_library_refusal_of_fsq_levels_is_one_line(monkeypatch):
    """A level set our own check lets through but the library refuses still gives a ConfigError."""
    import quantizers

    monkeypatch.setattr(quantizers, "validate_fsq_levels", lambda levels: list(levels))
    with pytest.raises(ConfigError, match="refused by vector_quantize_pytorch.FSQ"):
        quantizers.FSQWrapper([8, 2])


def test_cli_unknown_key_is_one_line_and_nonzero():
    result = run_script("train.py", "--quantiser=fsq")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown config key 'quantiser'; allowed keys: quantizer,")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_help_lists_every_knob():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for key in train.DEFAULT_CONFIG:
        assert f"\n{key} = " in result.stdout


def test_readme_config_table_lists_every_knob():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert [k for k in train.DEFAULT_CONFIG if f"| `{k}` | `" not in readme] == []
