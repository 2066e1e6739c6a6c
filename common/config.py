"""YAML presets -> one merged config -> the script's `Config` dataclass.

Semantics (the same for every script):
- `--config PATH` names a YAML file that may start with a `defaults:` list (`- model: qwen3_8b`), each entry
  naming `configs/<group>/<name>.yaml`, which may have defaults of its own.
- Merge order: `configs/train.yaml` -> each default in list order -> the file's own keys -> `key=value`
  overrides (dotted keys reach into nested maps; values are parsed as YAML). One flat namespace; maps merge.
- `${key}` / `${a.b}` interpolate after merging; `${env:NAME}` (or `${env:NAME,default}`) reads the
  environment and is never written back into a saved config.
- The result is validated against the dataclass: unknown keys name their source file and the closest
  known key; values are type-checked.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
GLOBALS_FILE = CONFIG_DIR / "train.yaml"
COMMAND_LINE = "the command line"
SECRET_KEY_PATTERN = re.compile(r"(api_?key|secret|password|(^|_)token)$", re.IGNORECASE)
_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")
# credentials inside URLs: `scheme://user:SECRET@host`, and secret-looking query parameters `?api-key=SECRET`
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*:)(?P<secret>[^/@\s]+)@", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?P<head>[?&](?:api[-_]?key|key|token|access[-_]?token|secret|password|sig|signature)=)"
                           r"(?P<secret>[^&#\s]+)", re.IGNORECASE)
_ENV_VALUES: set[str] = set()   # values read through ${env:...} in this process; never written anywhere
_MIN_ENV_VALUE = 6              # shorter values ("1", "true") are too common to hide by value


class ConfigError(ValueError):
    """A config problem found before any model is loaded."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading and composing YAML
# ---------------------------------------------------------------------------------------------------------------------

def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, sources: dict, source: str, prefix: str = "") -> None:
    """Merge `update` into `base` in place; nested maps merge, everything else replaces."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = value
        sources[dotted] = source


def _preset_path(group: str, name: str, referenced_from: Path) -> Path:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")) if (CONFIG_DIR / group).is_dir() else []
        hint = f"; available in configs/{group}/: {', '.join(available)}" if available else f"; no group configs/{group}/"
        raise ConfigError(f"{referenced_from}: default '{group}: {name}' -> {path} does not exist{hint}")
    return path


def compose_file(path: Path, merged: dict, sources: dict, stack: tuple = ()) -> None:
    """Merge `path` (after its own defaults) into `merged`."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular defaults: {chain}")
    data = load_yaml(path)
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: `defaults` must be a list like `- model: qwen3_8b`")
    own_merged = False
    for entry in defaults:
        if entry == "_self_":
            _merge(merged, data, sources, str(path))
            own_merged = True
            continue
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise ConfigError(f"{path}: each `defaults` entry must be `group: name` or `_self_`, got {entry!r}")
        (group, name), = entry.items()
        if name is None:
            continue
        group = str(group).split("@")[0]  # accept Hydra's `model@_global_: x`; everything is global here
        compose_file(_preset_path(group, str(name), path), merged, sources, (*stack, path))
    if not own_merged:
        _merge(merged, data, sources, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"command-line argument {text!r} is not `key=value` (or --config / --print-config)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("+")
    if not key:
        raise ConfigError(f"command-line argument {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(merged: dict, sources: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = merged
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    sources[key] = COMMAND_LINE


# ---------------------------------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------------------------------

def _lookup(root: dict, dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def interpolate(merged: dict, sources: dict) -> set[str]:
    """Resolve `${...}` in place. Returns the dotted keys whose value came from the environment."""
    env_keys: set[str] = set()

    def resolve_value(value: Any, key: str, stack: tuple) -> Any:
        if isinstance(value, dict):
            return {k: resolve_value(v, f"{key}.{k}", stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve_value(v, key, stack) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        full = _INTERPOLATION.fullmatch(value)
        if full:  # a lone reference keeps the referenced value's type
            return resolve_ref(full.group(1).strip(), key, stack)
        return _INTERPOLATION.sub(lambda m: str(resolve_ref(m.group(1).strip(), key, stack)), value)

    def resolve_ref(ref: str, key: str, stack: tuple) -> Any:
        where = sources.get(key) or sources.get(key.split(".")[0], "?")
        if ref.startswith("env:"):
            name, _, default = ref[4:].partition(",")
            env_keys.add(key)
            if name.strip() in os.environ:
                if len(os.environ[name.strip()]) >= _MIN_ENV_VALUE:
                    _ENV_VALUES.add(os.environ[name.strip()])
                return os.environ[name.strip()]
            if default:
                return yaml.safe_load(default.strip())
            raise ConfigError(f"{where}: key '{key}' reads environment variable {name.strip()!r}, which is not set")
        if ref in stack:
            raise ConfigError(f"{where}: circular interpolation: {' -> '.join((*stack, ref))}")
        try:
            target = _lookup(merged, ref)
        except KeyError:
            raise ConfigError(f"{where}: key '{key}' refers to ${{{ref}}}, but no key '{ref}' is set") from None
        resolved = resolve_value(target, ref, (*stack, ref))
        if ref in env_keys or any(k.startswith(ref + ".") for k in env_keys):
            env_keys.add(key)
        return resolved

    for top in list(merged):
        merged[top] = resolve_value(merged[top], top, (top,))
    return env_keys


# ---------------------------------------------------------------------------------------------------------------------
# Validation against the dataclass
# ---------------------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, numeric strings too)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:   # Optional[X]: X's own error, which names a nested key (`judge_weights.accuracy`)
            return _coerce(value, options[0], key, where)
        for arg in options:
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]  # `reward_funcs=arithmetic` on the command line means a one-item list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a list")
        (item_tp, *_), = [typing.get_args(tp) or (Any,)]
        return [_coerce(v, item_tp, key, where) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a mapping")
        if not typing.get_args(tp):
            return value
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key, where): _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a mapping of {_type_name(tp)} keys")
        return value  # nested dataclasses are built by _build
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `5e-7` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a string")
    return value


def _build(cls: type, values: dict, sources: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        where = sources.get(prefix.rstrip("."), sources.get("", "?"))
        raise ConfigError(f"{where}: missing required key(s) {', '.join(prefix + name for name in missing)}")
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        where = sources.get(dotted, sources.get(prefix.rstrip("."), "?"))
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{dotted}'{hint}")
        tp = hints[key]
        value = _coerce(value, tp, dotted, where)
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):
            value = _build(nested[0], value, sources, dotted + ".")
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Ranges: each Config class may declare `RANGES = {"key": "[1, inf)", "lora.r": "[1, inf)", ...}`; the tables of a
# class and its bases are merged. "[a, b]" / "(a, b)" are closed / open ends; "inf" is unbounded (and never
# reached: an open end). A trailing "if other_key" applies the range only when other_key is true. null and strings
# pass (the type says whether they are allowed: `Union[int, Literal["auto"]]`); a list or a mapping is checked item
# by item; NaN never passes.
# ---------------------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^([\[(])\s*([-+\w.]+)\s*,\s*([-+\w.]+)\s*([\])])(?:\s+if\s+([\w.]+))?$")


def parse_range(text: str) -> tuple[float, float, bool, bool, Optional[str]]:
    """"[1, inf) if do_eval" -> (low, high, low_closed, high_closed, condition key)."""
    match = _RANGE.match(text.strip())
    if not match:
        raise ValueError(f"malformed range {text!r}: expected e.g. '[0, 1)' or '(0, inf) if key'")
    left, low, high, right, condition = match.groups()
    return float(low), float(high), left == "[", right == "]", condition


def class_ranges(cls: type) -> dict[str, str]:
    ranges: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("RANGES", {}))
    return ranges


def _in_range(value: float, low: float, high: float, low_closed: bool, high_closed: bool) -> bool:
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return bool(above and below)  # NaN: both False


def _dotted_get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: Any, sources: Optional[dict] = None) -> None:
    """Every ranged key of `cfg` inside its range, or one ConfigError naming the key, its value and the range."""
    for key, text in class_ranges(type(cfg)).items():
        low, high, low_closed, high_closed, condition = parse_range(text)
        if condition and not _dotted_get(cfg, condition):
            continue
        value = _dotted_get(cfg, key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is None or isinstance(item, str) or _in_range(float(item), low, high, low_closed, high_closed):
                continue
            where = (sources or {}).get(key, (sources or {}).get(key.split(".")[0], ""))
            kind = "an integer" if isinstance(item, int) else "a number"
            interval = text.split(" if ")[0].strip()
            when = f" when {condition} is true" if condition else ""
            raise ConfigError(f"{where + ': ' if where else ''}key '{key}' = {value!r}: expected {kind} in "
                              f"{interval}{when}")


# ---------------------------------------------------------------------------------------------------------------------
# Batch math
# ---------------------------------------------------------------------------------------------------------------------

def resolve_batch_sizes(cfg: Any, num_processes: int) -> None:
    """train_batch_size = per_device_train_batch_size x gradient_accumulation_steps x num_processes.

    Any two determine the third; all three must agree. Sets the missing one on `cfg`.
    """
    total, per_device, accum = cfg.train_batch_size, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    given = sum(v is not None for v in (total, per_device, accum))
    for name, value in (("train_batch_size", total), ("per_device_train_batch_size", per_device),
                        ("gradient_accumulation_steps", accum)):
        if value is not None and value < 1:
            raise ConfigError(f"batch math: {name} = {value} must be >= 1")
    if given < 2:
        raise ConfigError("batch math: set at least two of train_batch_size, per_device_train_batch_size, "
                          "gradient_accumulation_steps")
    formula = (f"train_batch_size = per_device_train_batch_size x gradient_accumulation_steps x num_processes "
               f"({num_processes})")
    if total is None:
        cfg.train_batch_size = per_device * accum * num_processes
    elif per_device is None:
        if total % (accum * num_processes):
            raise ConfigError(f"batch math: train_batch_size {total} is not divisible by gradient_accumulation_steps "
                              f"{accum} x {num_processes} processes; {formula}")
        cfg.per_device_train_batch_size = total // (accum * num_processes)
    elif accum is None:
        if total % (per_device * num_processes):
            raise ConfigError(f"batch math: train_batch_size {total} is not divisible by per_device_train_batch_size "
                              f"{per_device} x {num_processes} processes; {formula}. Change one of them, or set "
                              f"gradient_accumulation_steps and train_batch_size=null")
        cfg.gradient_accumulation_steps = total // (per_device * num_processes)
    elif total != per_device * accum * num_processes:
        raise ConfigError(f"batch math: train_batch_size {total} != per_device_train_batch_size {per_device} x "
                          f"gradient_accumulation_steps {accum} x {num_processes} processes; set one of the three "
                          f"to null to have it computed")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `org/name`, as `from_pretrained` accepts it


def is_missing_local_path(value: str) -> bool:
    """True when `value` does not exist and cannot be a hub id: a mistyped local path (fail here, not at the hub)."""
    if Path(value).expanduser().exists():
        return False
    first = value.split("/")[0]
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or not _HUB_ID.fullmatch(value)
            or (value.count("/") == 1 and Path(first).is_dir()))


def world_size_from_env() -> int:
    """Number of processes as launchers (accelerate, torchrun, SLURM via accelerate) announce it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------------------------------
# _target_
# ---------------------------------------------------------------------------------------------------------------------

def import_target(path: str, key: str = "_target_") -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"key '{key}' = {path!r}: expected `module.function`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"key '{key}' = {path!r}: cannot import module {module_name!r}: {err}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"key '{key}' = {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def instantiate(spec: dict, *args: Any, key: str = "_target_", **extra: Any) -> Any:
    """Call the callable named by spec['_target_'] with the spec's other keys as keyword arguments."""
    if "_target_" not in spec:
        raise ConfigError(f"key '{key}' needs a `_target_: module.function` entry")
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    target = import_target(spec["_target_"], f"{key}._target_")
    try:
        inspect.signature(target).bind(*args, **kwargs, **extra)
    except TypeError as err:  # an unknown or missing keyword: name the block, not a Python traceback
        try:
            takes = ", ".join(p for p in inspect.signature(target).parameters if p not in ("self", "cfg"))
        except (TypeError, ValueError):
            takes = "?"
        raise ConfigError(f"key '{key}': {spec['_target_']} cannot be called with {sorted(kwargs)} ({err}); it "
                          f"takes: {takes}") from None
    except ValueError:  # no signature to check (a builtin): call it as given
        pass
    return target(*args, **kwargs, **extra)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point for scripts
# ---------------------------------------------------------------------------------------------------------------------

def compose(config_path: Optional[str], overrides: list[str]) -> tuple[dict, dict, set]:
    merged: dict = {}
    sources: dict = {}
    if GLOBALS_FILE.is_file():
        compose_file(GLOBALS_FILE, merged, sources)
    if config_path:
        path = Path(config_path)
        if not path.is_file() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        compose_file(path, merged, sources)
    for text in overrides:
        apply_override(merged, sources, *parse_override(text))
    env_keys = interpolate(merged, sources)
    return merged, sources, env_keys


def load_config(cls: type, argv: Optional[list[str]] = None, description: str = "") -> Any:
    """Parse `--config`, `--print-config` and `key=value` overrides into an instance of `cls`.

    With `--print-config`, prints the resolved config (and the batch math) and exits.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys (key=value overrides; dotted keys for nested maps):\n" + describe_keys(cls),
    )
    parser.add_argument("--config", help="YAML recipe or preset, e.g. configs/recipe/teacher_sft.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied last")
    args = parser.parse_args(argv)
    merged, sources, env_keys = compose(args.config, args.overrides)
    cfg = _build(cls, merged, sources)
    cfg._env_keys = env_keys  # keys never written back with their values
    cfg._config_path = args.config
    check_ranges(cfg, sources)
    resolve_batch_sizes(cfg, world_size_from_env())
    if hasattr(cfg, "validate"):
        cfg.validate()
    if args.print_config:
        print(dump_config(cfg), end="")
        print(f"# batch: train_batch_size {cfg.train_batch_size} = per_device_train_batch_size "
              f"{cfg.per_device_train_batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
              f"x {world_size_from_env()} process(es)")
        sys.exit(0)
    return cfg


def load_config_file(cls: type, path: Path, overrides: list[str]) -> Any:
    """One standalone YAML file (no `defaults:`, no globals, no `${...}`) plus `key=value` overrides -> `cls`,
    checked as the scripts' configs are: unknown and missing keys, types, RANGES, then `validate()`."""
    merged, sources = {}, {"": str(path)}
    _merge(merged, load_yaml(path), sources, str(path))
    for text in overrides:
        if "=" not in str(text):
            raise ConfigError(f"{path}: override {text!r}: expected key=value")
        key, value = parse_override(str(text))
        apply_override(merged, sources, key, value)
        sources[key] = f"{path} (override {key})"
    cfg = _build(cls, merged, sources)
    cfg._source = str(path)
    check_ranges(cfg, sources)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def describe_keys(cls: type) -> str:
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


def redact_text(text: str) -> str:
    """A string with environment-read values, URL passwords and secret query parameters replaced."""
    for value in sorted(_ENV_VALUES, key=len, reverse=True):
        text = text.replace(value, "<from environment>")
    text = _URL_PASSWORD.sub(lambda m: m["head"] + "<redacted>@", text)
    return _SECRET_QUERY.sub(lambda m: m["head"] + "<redacted>", text)


def redact(node: Any, env_keys: frozenset | set = frozenset(), prefix: str = "") -> Any:
    """The one redaction for every config-like file we write (config.yaml, reward_system.yaml, checkpoint state):
    keys read from the environment and secret-looking keys lose their values, and every string goes through
    `redact_text`."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            dotted = f"{prefix}{k}"
            if dotted in env_keys:
                out[k] = "<from environment>"
            elif SECRET_KEY_PATTERN.search(str(k)) and v not in (None, "") and not str(k).endswith("_env"):
                out[k] = "<redacted>"
            else:
                out[k] = redact(v, env_keys, dotted + ".")
        return out
    if isinstance(node, (list, tuple)):
        return [redact(v, env_keys, prefix) for v in node]
    return redact_text(node) if isinstance(node, str) else node


def config_to_dict(cfg: Any) -> dict:
    """The config as plain data, with environment-derived and secret-looking values left out."""
    return redact(dataclasses.asdict(cfg), getattr(cfg, "_env_keys", set()))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, output_dir: str) -> Path:
    """Write the resolved config to output_dir/config.yaml atomically."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def fail_fast():
    """Bad input found before any model loads: one line on stderr, exit status 2, no traceback.

    Wrap only the set-up stage (config, data); errors during training keep their tracebacks.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line `key=value` arguments with secret-looking keys' values replaced (trackers record argv)."""
    redacted = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        last = key.lstrip("+").split(".")[-1]
        redacted.append(f"{key}=<redacted>" if sep and SECRET_KEY_PATTERN.search(last) else redact_text(arg))
    return redacted
