"""--key=value overrides and config checks: bad input stops with one clear line."""
import os

import pytest

import train
from conftest import REPO, resolve, run_script
from discrete_ae.errors import ConfigError
from discrete_ae.overrides import parse_overrides

DEFAULTS = dict(lr=3e-4, epochs=50, quantizer="ddcl", fsq_levels=[8, 6, 6, 5], compile=False, channels=[16, 32, 64])
SCRIPTS = ["train.py", "evaluate.py", "bench.py", "codec.py", "scripts/make_patches.py", "scripts/compare.py",
           "scripts/check_rates.py", "scripts/fit_context_prior.py", "scripts/compare_priors.py"]


def test_overrides_parse_literals_and_check_types():
    config, given = parse_overrides(["--lr=1e-3", "--epochs=5", "--quantizer=fsq", "--fsq_levels=[8,5,5,5]",
                                     "--compile=True"], DEFAULTS)
    assert config == dict(lr=1e-3, epochs=5, quantizer="fsq", fsq_levels=[8, 5, 5, 5], compile=True, channels=[16, 32, 64])
    assert given == {"lr", "epochs", "quantizer", "fsq_levels", "compile"}


def test_int_is_accepted_where_float_is_expected():
    config, _ = parse_overrides(["--lr=1"], DEFAULTS)
    assert config["lr"] == 1.0 and isinstance(config["lr"], float)


@pytest.mark.parametrize("arg, message", [
    ("--learning_rate=1", "unknown option 'learning_rate'; allowed: lr, epochs"),
    ("--epochs=2.5", "--epochs=2.5: expected int"),
    ("--epochs=True", "--epochs=True: expected int"),
    ("--compile=1", "--compile=1: expected bool"),
    ("--fsq_levels=8", "--fsq_levels=8: expected list"),
    ("--fsq_levels=[8,5.5]", "expected a list of int"),
    ("--lr=fast", "--lr=fast: not a Python literal; expected float"),
    ("--lr", "option --lr has no value: write --lr=VALUE or --lr VALUE"),
    ("epochs=3", "argument 'epochs=3' is not an option: write --key=value or --key value"),
])
def test_bad_overrides_name_the_problem(arg, message):
    with pytest.raises(ConfigError, match=None) as err:
        parse_overrides([arg], DEFAULTS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_argparse_habits_work_too():
    config, given = parse_overrides(["--epochs", "3", "--lr=0.5", "--fsq_levels", "[8, 5, 5, 5]"],
                                    {**DEFAULTS, "fsq_levels": [8, 6, 6, 5]})
    assert (config["epochs"], config["lr"], config["fsq_levels"], given) == (3, 0.5, [8, 5, 5, 5], {"epochs", "lr", "fsq_levels"})
    with pytest.raises(ConfigError, match="option --epochs has no value"):
        parse_overrides(["--epochs", "--lr=1"], DEFAULTS)


def test_no_exec_of_override_values():
    with pytest.raises(ConfigError):
        parse_overrides(["--quantizer=__import__('os').system('echo hacked')"], {"quantizer": 1})


@pytest.mark.parametrize("args, message", [
    (["--quantizer=fsq", "--fsq_levels=[8,2,5]"], "every level must be >= 3"),
    (["--quantizer=fsq", "--fsq_levels=[]"], "non-empty list"),
    (["--quantizer=ddcl", "--ddcl_delta=0"], "ddcl_delta must be a finite number > 0"),
    (["--quantizer=ddcl", "--ddcl_delta=-0.1"], "ddcl_delta must be a finite number > 0"),
    (["--batch_size=0"], "batch_size=0 must be > 0"),
    (["--checkpoint_every=-1"], "checkpoint_every=-1 must be >= 0"),
    (["--epochs=0"], "epochs=0: a new run trains at least one epoch"),
    (["--lr=0"], "lr=0.0 must be a finite number > 0"),
    (["--symmetries=3"], "symmetries=3; choose one of (1, 2, 4, 8)"),
    (["--run_name=a/b"], "run_name='a/b' is not a plain name"),
    (["--run_name=../x"], "run_name='../x' is not a plain name"),
    (["--color_gain=1.0"], "color_gain=1.0 must be in [0, 1)"),
    (["--color_gain=-0.1"], "color_gain=-0.1 must be in [0, 1)"),
    (["--quantizer=pq"], "quantizer='pq' is unknown"),
    (["--quantizer=fsq", "--latent_dim=6"], "fsq implies latent_dim = 4"),
    (["--channels=[8,8]"], "channels must be three positive integers"),
    (["--amp=fp8"], "amp='fp8'"),
    (["--dataset=imagenet"], "dataset='imagenet' is unknown"),
    (["--quantizer=vq", "--codebook_size=1"], "codebook_size must be an integer >= 2 for quantizer=vq"),
    (["--quantizer=simvq", "--codebook_size=0"], "codebook_size must be an integer >= 2 for quantizer=simvq"),
    (["--quantizer=lfq", "--codebook_size=1000"], "quantizer=lfq needs codebook_size a power of 2"),
    (["--quantizer=rfsq", "--num_quantizers=0"], "num_quantizers must be an integer >= 1"),
    (["--quantizer=fsp", "--fsq_levels=[8,2]"], "every level must be >= 3"),
    (["--quantizer=lfq", "--latent_dim=3"], "lfq implies latent_dim = 10"),
    (["--entropy_model=trained"], "entropy_model='trained'; choose one of fitted, learned, context"),
    (["--quantizer=none", "--entropy_model=context"], "needs a bottleneck that sends integers"),
    (["--quantizer=none", "--entropy_model=context"], "needs a bottleneck that sends integers"),
    (["--quantizer=none", "--entropy_model=learned"], "needs a bottleneck that sends integers"),
    (["--quantizer=vae", "--entropy_model=learned"], "needs a bottleneck that sends integers"),
    (["--entropy_model=learned", "--rate_weight=-0.1"], "rate_weight must be a finite number >= 0"),
])
def test_invalid_settings_are_refused(args, message):
    with pytest.raises(ConfigError) as err:
        resolve(args)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("quantizer, args, latent_dim", [("fsq", ["--fsq_levels=[7,5,5,5,5]"], 5),
                                                         ("fsp", ["--fsq_levels=[8,6,5]"], 3),
                                                         ("rfsq", ["--fsq_levels=[4,4]"], 2),
                                                         ("lfq", ["--codebook_size=256"], 8)])
def test_the_bottleneck_sets_latent_dim(quantizer, args, latent_dim):
    assert resolve([f"--quantizer={quantizer}", *args])["latent_dim"] == latent_dim


def test_config_block_has_at_most_32_knobs_with_short_comments():
    assert len(train.DEFAULT_CONFIG) <= 32
    block = open(os.path.join(REPO, "train.py")).read().split("# " + "-" * 77 + " config\n")[1].split("# ---")[0]
    knob_lines = [line for line in block.splitlines() if " = " in line and not line.startswith("#")]
    assert len(knob_lines) == len(train.DEFAULT_CONFIG)
    assert all(len(line.split("  # ", 1)[1]) <= 100 for line in knob_lines)


def test_cli_unknown_key_is_one_line_and_nonzero():
    result = run_script("train.py", "--quantiser=fsq")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown option 'quantiser'; allowed: quantizer,")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_help_lists_every_knob():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for key in train.DEFAULT_CONFIG:
        assert f"\n{key} = " in result.stdout


def test_readme_config_table_lists_every_knob():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert [k for k in train.DEFAULT_CONFIG if f"| `{k}` | `" not in readme] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and not result.stderr.strip()


def test_help_into_a_pipe_whose_reader_left_is_quiet():
    """`python codec.py --help | head -1` must not end in a BrokenPipeError traceback."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the script writes: EPIPE on the first write, every time
    try:
        done = subprocess.run([sys.executable, os.path.join(REPO, "codec.py"), "--help"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""
