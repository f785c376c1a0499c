"""train.py's config: the defaults of its config block, --key=value overrides, and on --resume the
checkpoint's own settings, checked into one `config` dict (saved into every checkpoint and run folder).

What a resume takes from the checkpoint: every knob you do not pass, except where the run writes
and reads (`output_dir`, `checkpoint_dir`, `device`, and `data_dir`, which must be named again when
it differs from the default): a file from elsewhere never chooses a folder. Its run name is taken
when you pass none (discrete_ae/runs.py checks it is a plain name).
"""
import json
import math
import os

from discrete_ae.data import SYMMETRIES, check_dataset
from discrete_ae.errors import CheckpointError, ConfigError
from discrete_ae.overrides import coerce, parse_overrides, split_arguments
from discrete_ae.runs import RunFiles, check_run_name
from models import build_model, model_args_from_config
from quantizers import implied_latent_dim
from utils import TRAINING_STATE, check_structure, read_checkpoint

AMP_CHOICES = ("auto", "bf16", "off")
OPTIMIZERS = ("muon", "adam")
NEVER_FROM_CHECKPOINT = ("output_dir", "checkpoint_dir", "resume", "device", "data_dir")


def validate_config(config, given=(), fresh=True):
    """Stop with one line on any value that cannot work; fill in derived values."""
    if config["batch_size"] <= 0:
        raise ConfigError(f"batch_size={config['batch_size']} must be > 0")
    for key in ("epochs", "checkpoint_every", "max_train_images"):
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} must be >= 0")
    if fresh and config["epochs"] == 0:
        raise ConfigError("epochs=0: a new run trains at least one epoch (--epochs=N)")
    for key in ("lr", "muon_lr"):
        if not (config[key] > 0 and math.isfinite(config[key])):
            raise ConfigError(f"{key}={config[key]} must be a finite number > 0")
    if config["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer={config['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}")
    if config["symmetries"] not in SYMMETRIES:
        raise ConfigError(f"symmetries={config['symmetries']}; choose one of {SYMMETRIES} (views of each training crop)")
    if not 0 <= config["color_gain"] < 1:
        raise ConfigError(f"color_gain={config['color_gain']} must be in [0, 1) (gains are drawn from [1 - c, 1 + c]), e.g. 0.2")
    if config["amp"] not in AMP_CHOICES:
        raise ConfigError(f"amp={config['amp']!r}; choose one of {', '.join(AMP_CHOICES)}")
    if config["run_name"]:
        check_run_name(config["run_name"])
    check_dataset(config["dataset"])
    implied = implied_latent_dim(config)  # FSQ, FSP, residual FSQ: one channel per level; LFQ: one per bit
    if implied is not None and "latent_dim" not in given:
        config["latent_dim"] = implied  # a contradicting --latent_dim is refused by build_model
    build_model(model_args_from_config(config))  # every architecture check, before any data is read
    return config


def saved_config_arguments(argv, defaults):
    """argv with `--config=FILE` (a run's saved {run}_config.json) replaced by that run's knobs as
    --key=value arguments, before the rest, so the rest override them. Folders and data locations
    are not taken from the file (NEVER_FROM_CHECKPOINT), nor keys this train.py does not know."""
    _, options = split_arguments(argv)
    files = [a.split("=", 1)[1] for a in options if a.startswith("--config=")]
    rest = [a for a in options if not a.startswith("--config=")]
    if not files:
        return rest
    if len(files) > 1:
        raise ConfigError("--config given twice: rerun one saved config, then override knobs with --key=value")
    path = files[0]
    try:
        with open(path) as f:
            saved = json.load(f)
    except OSError as err:
        raise ConfigError(f"--config={path}: cannot read it ({err.strerror}); pass a run's outputs/{{run}}_config.json") from None
    except ValueError:
        raise ConfigError(f"--config={path} is not JSON: pass a run's outputs/{{run}}_config.json") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--config={path} holds a {type(saved).__name__}, not a run's config")
    derived = ("latent_dim",) if saved.get("quantizer") in ("fsq", "fsp", "rfsq", "lfq") else ()  # set by the levels
    taken = [f"--{k}={v!r}" for k, v in saved.items() if k in defaults and k not in NEVER_FROM_CHECKPOINT + derived]
    return taken + rest


def resolve_config(argv, defaults):
    """Defaults + a saved config (--config=FILE) + --key=value overrides (+ the resumed checkpoint's
    config) -> (checked config, the resumed checkpoint's state or None)."""
    config, given = parse_overrides(saved_config_arguments(argv, defaults), defaults)
    if not config["resume"]:
        return validate_config(config, given), None
    path = resume_path(config, given)
    state = read_checkpoint(path)
    check_structure(path, state, TRAINING_STATE)  # what a resume needs beyond what evaluation does
    saved = state["config"]
    if "context_prior_fitted_to" in saved:
        raise CheckpointError(f"{path} holds a context prior fitted after training (scripts/fit_context_prior.py): it "
                              f"evaluates and compresses but does not train on; resume {saved['context_prior_fitted_to']}")
    unknown = sorted(set(saved) - set(defaults))
    if unknown:
        raise CheckpointError(f"{path} was written with config keys this train.py does not know: {', '.join(unknown)}")
    try:
        saved = {k: coerce(k, v, defaults[k]) for k, v in saved.items()}
    except ConfigError as err:
        raise CheckpointError(f"{path} holds an invalid config: {err}") from None
    changed = [k for k in model_args_from_config(saved) if k in given and config[k] != saved[k]]
    if changed:
        raise ConfigError(f"cannot resume {path} with a different architecture: "
                          + ", ".join(f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in changed))
    if "optimizer" in given and config["optimizer"] != saved["optimizer"]:
        raise ConfigError(f"cannot resume {path} with optimizer={config['optimizer']!r}: it holds the state of "
                          f"optimizer={saved['optimizer']!r}; drop --optimizer, or start a new run without --resume")
    if "data_dir" not in given and saved["data_dir"] != config["data_dir"]:
        raise ConfigError(f"{path} was trained on data_dir={saved['data_dir']!r} ({saved['dataset']}): pass "
                          f"--data_dir={saved['data_dir']} to continue on it, or another --data_dir to continue on "
                          "other data")
    taken = {k: v for k, v in saved.items() if k not in given and k not in NEVER_FROM_CHECKPOINT}
    if taken.get("run_name"):
        check_run_name(taken["run_name"], f"the run name stored in {path}")
    config = {**config, **taken, "resume": path}
    return validate_config(config, given, fresh=False), state


def resume_path(config, given):
    """`resume` as a path; "last" is the run's last checkpoint, or the newest one in checkpoint_dir
    when neither run_name nor quantizer was given."""
    if config["resume"] != "last":
        return config["resume"]
    folder = config["checkpoint_dir"]
    if given & {"run_name", "quantizer"}:
        path = RunFiles(config["output_dir"], folder, config["run_name"] or config["quantizer"]).checkpoint("last")
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume=last: no {path}; train first or pass a checkpoint path")
        return path
    found = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    found = [p for p in found if p.endswith("_vae_last.pt")]
    if not found:
        raise CheckpointError(f"--resume=last: no *_vae_last.pt in {folder!r}; train first or pass a checkpoint path")
    return max(found, key=os.path.getmtime)
