"""--key=value overrides: Python literals (never executed) checked against the default's type."""
import ast

from discrete_ae.errors import ConfigError


def parse_value(key, text, default):
    """Parse `text` as a Python literal (no exec) and check it against `default`'s type."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if not isinstance(default, str):
            raise ConfigError(f"--{key}={text}: not a Python literal; expected {type(default).__name__} like {default!r}") from None
        value = text  # a bare word is a string: --quantizer=fsq
    return coerce(key, value, default, f"--{key}={text}")


def coerce(key, value, default, shown=None):
    """`value` with `default`'s type (an int is accepted for a float), or a ConfigError."""
    shown = shown or f"{key}={value!r}"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{shown}: expected {type(default).__name__} (like {default!r}), got {type(value).__name__}")
    if isinstance(default, list) and default:
        kind = type(default[0])
        if kind is float:
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not all(type(v) is kind for v in value):
            raise ConfigError(f"{shown}: expected a list of {kind.__name__} (like {default!r})")
    return value


def split_arguments(argv):
    """argv -> (positional arguments, ["--key=value", ...]); "--key value" is read as "--key=value"."""
    positional, options, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"option {arg} has no value: write {arg}=VALUE or {arg} VALUE (see --help)")
            options.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        (options if arg.startswith("--") else positional).append(arg)
        i += 1
    return positional, options


def parse_overrides(argv, defaults):
    """`--key=value` (or `--key value`) arguments -> (options dict, set of keys given). Unknown keys stop."""
    positional, options = split_arguments(argv)
    if positional:
        raise ConfigError(f"argument {positional[0]!r} is not an option: write --key=value or --key value (see --help)")
    config, given = dict(defaults), set()
    for arg in options:
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown option {key!r}; allowed: {', '.join(defaults)} (see --help)")
        config[key] = parse_value(key, text, defaults[key])
        given.add(key)
    return config, given


def parse_paths_and_options(argv, defaults, usage, count=None):
    """File paths and --key=value options (checked against `defaults`) -> (paths, options). Too few
    paths (none, or other than `count` when given) stop with `usage`."""
    paths, options = split_arguments(argv)
    options, _ = parse_overrides(options, defaults)
    if not paths or (count is not None and len(paths) != count):
        raise ConfigError(usage)
    return paths, options
