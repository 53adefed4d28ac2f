"""big_vision-style config files on the command line, checked before anything is created.

A config file is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`; `--config FILE:ARG` passes
ARG. The API (no JAX import, so mistakes are reported in a fraction of a second):

    parse_args(argv, *, default_config, flags=None, search_dirs=(), prog="train.py") -> (cfg, flag_values)
        `--config FILE[:ARG]` (default `default_config`), `--config.KEY VALUE` / `--config.KEY=VALUE` overrides
        applied in order, `--NAME VALUE` for each NAME in `flags` ({name: default}), `-h/--help` prints the fields
        and exits 0. A relative FILE that is not in the current folder is looked up in `search_dirs` (train.py
        passes its own folder, so `python /path/to/train.py --config configs/x.py` works from anywhere).
        Returns the locked ConfigDict and {name: value}. Raises ConfigError for every mistake.
    load_config(spec, search_dirs=()) -> ConfigDict                      the file part of the above
    apply_overrides(cfg, [(key, text), ...]) -> None                     the `--config.KEY` part (typed by the field)
    validate(cfg, rules=DEFAULT_RULES, choices=DEFAULT_CHOICES) -> None  numeric / choice checks, see below
    check_workdir(path, flag="--workdir") -> pathlib.Path                absolute path; refuses a file; creates nothing
    distributed_config() -> ConfigDict                                   the `distributed` group (multi-host runs)

Override syntax, typed by the field's current value: numbers as usual (an int field takes an integral value such as
`1000` or `1e3`), bools `true/false/1/0/yes/no`, strings verbatim, list/tuple fields as a JSON/Python list
`--config.lora.targets='["a.*", "b.*"]'` or a comma list `--config.latent_hw=16,16` (items are converted to the type of
the default's items; use the bracket form when an item contains a comma), `''` for an empty list. A field whose
default is None takes a Python literal, else the string. Unknown keys are errors with a did-you-mean suggestion.

`validate` rules: every number in the config (also inside lists) must be finite; `rules` maps fnmatch patterns over
dotted keys (`"*lr"` matches `lr` and `student.lr`) to conditions `">=1"`, `">0"`, `"<=1"`, `"!=0"`, joined by `,`
(all must hold). The first pattern that matches a key decides (so specific patterns go first, as
`"*sample_every": ">=0"` before `"*_every": ">=1"`). Error text: `--config.batch_size must be >= 1, got 0`.
"""
from __future__ import annotations

import ast
import difflib
import fnmatch
import importlib.util
import json
import math
import operator
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import ml_collections

from turbojax.training.errors import UserError


class ConfigError(UserError):
    """A bad config file, flag, key or value."""


# Conditions for the fields our configs share, first match wins; a script passes its own `rules` for more
# (`{"gan.weight": ">=0", **DEFAULT_RULES}`: its specific patterns first).
DEFAULT_RULES: dict[str, str] = {
    "seed": ">=0,<2147483648",
    "*batch_size": ">=1",
    "*total_steps": ">=1",
    "*warmup_steps": ">=0",
    "*lr": ">=0",
    "*learning_rate": ">=0",
    "*weight_decay": ">=0",
    "*grad_clip": ">0",
    "*sample_every": ">=0",  # 0: no sample grids
    "*_every": ">=1",
    "*keep_checkpoints": ">=1",
    "*rank": ">=1",
    "*lora*.alpha": ">0",
    "*num_examples": ">=1",
    "*text_len": ">=1",
    "*latent_hw": ">=1",
    "*ema_decay": ">=0,<=1",
    "mesh.*": ">=-1,!=0",  # -1: all remaining devices
    "distributed.num_processes": ">=1",
    "distributed.process_id": ">=0",
    "distributed.timeout_s": ">0",
}
DEFAULT_CHOICES: dict[str, tuple[str, ...]] = {
    "*dtype": ("float32", "bfloat16", "float16", "float64"),
}

_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _split_spec(spec: str) -> tuple[str, str | None]:
    """`file.py:arg` -> (file.py, arg); a colon not preceded by `.py` is part of the path."""
    head, sep, arg = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return head, arg
    return spec, None


def load_config(spec: str, search_dirs: Sequence[Path | str] = ()) -> ml_collections.ConfigDict:
    """Import the config file of `spec` (`FILE[:ARG]`) and return its `get_config([ARG])`, unlocked."""
    file, arg = _split_spec(str(spec))
    if not file:
        raise ConfigError("--config is empty; give a config file such as configs/qwen_image_lora.py")
    path = Path(file).expanduser()
    candidates = [path] + ([Path(d) / path for d in search_dirs] if not path.is_absolute() else [])
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = f" (also looked in {', '.join(str(d) for d in search_dirs)})" if search_dirs and not path.is_absolute() else ""
        if path.is_dir():
            raise ConfigError(f"--config {file} is a folder, not a config file")
        raise ConfigError(f"--config file {file} not found{where}")
    name = f"_turbojax_config_{abs(hash(str(found.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(name, found)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config file {file}: invalid Python at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # the user's file raised while importing
        raise ConfigError(f"--config file {file} failed to import: {type(e).__name__}: {e}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config file {file} defines no get_config() function")
    try:
        cfg = get_config(arg) if arg is not None else get_config()
    except Exception as e:
        raise ConfigError(f"--config {spec}: get_config({'' if arg is None else repr(arg)}) raised "
                          f"{type(e).__name__}: {e}") from None
    if isinstance(cfg, Mapping) and not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config {spec}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------------
def flat_items(cfg: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, object]]:
    """(dotted key, value) for every leaf field, groups descended into, in definition order."""
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _all_keys(cfg) -> list[str]:
    keys = []
    for key, _ in flat_items(cfg):
        keys.append(key)
    groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    return keys + sorted(groups)


def _unknown_key(cfg, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.6)
    if close:
        return ConfigError(f"unknown config key --config.{key}; did you mean --config.{close[0]}?")
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        group = _lookup(cfg, parent) if parent else cfg
        fields = sorted(group.keys()) if isinstance(group, ml_collections.ConfigDict) else []
    except KeyError:
        fields = sorted(cfg.keys())
    where = f"--config.{parent}" if parent and fields else "the config"
    return ConfigError(f"unknown config key --config.{key}; {where} has " + ", ".join(fields or sorted(cfg.keys())))


def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _scalar(key: str, text: str, kind: type):
    t = text.strip()
    if kind is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ConfigError(f"--config.{key} expects true or false, got {text!r}")
    if kind is int:
        try:
            return int(t)
        except ValueError:
            pass
        try:
            f = float(t)
        except ValueError:
            f = None
        if f is not None and math.isfinite(f) and f.is_integer():
            return int(f)
        raise ConfigError(f"--config.{key} expects an integer, got {text!r}")
    if kind is float:
        try:
            return float(t)
        except ValueError:
            raise ConfigError(f"--config.{key} expects a number, got {text!r}") from None
    return text if kind is str else t


def _literal(text: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    with warnings.catch_warnings():  # regexes such as "a\.b" are invalid escapes for Python, kept verbatim
        warnings.simplefilter("ignore")
        return ast.literal_eval(text)


def _sequence(key: str, text: str, current: list | tuple):
    t = text.strip()
    strings = bool(current) and all(isinstance(x, str) for x in current)
    items = None
    if t and t[0] in "[(":
        try:
            items = _literal(t)
        except (ValueError, SyntaxError):
            if not strings:  # a list of strings (regexes) may start with "[": then it is a comma list
                raise ConfigError(f"--config.{key} expects a list such as '[\"a\", \"b\"]' or a comma list a,b; "
                                  f"cannot read {text!r}") from None
        if items is not None and not isinstance(items, (list, tuple)):
            raise ConfigError(f"--config.{key} expects a list, got {text!r}")
    if items is None:
        items = [] if not t else [s.strip() for s in t.split(",")]
    items = list(items)
    kinds = {type(x) for x in current}
    if len(kinds) == 1 and (kind := kinds.pop()) in (bool, int, float, str):
        out = []
        for i, x in enumerate(items):
            if isinstance(x, str) and kind is not str:
                x = _scalar(f"{key}[{i}]", x, kind)
            elif kind is float and isinstance(x, int) and not isinstance(x, bool):
                x = float(x)
            if type(x) is not kind:
                raise ConfigError(f"--config.{key}[{i}] expects {kind.__name__}, got {x!r}")
            out.append(x)
        items = out
    return type(current)(items)


def parse_value(key: str, text: str, current):
    """The value of `--config.KEY TEXT` for a field whose current value is `current` (which sets the type)."""
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a group; set its fields instead: "
                          + ", ".join(f"--config.{key}.{k}" for k in sorted(current.keys())))
    if isinstance(current, (bool, int, float, str)):
        return _scalar(key, text, type(current))
    if isinstance(current, (list, tuple)):
        return _sequence(key, text, current)
    if current is None:
        try:
            return _literal(text)
        except (ValueError, SyntaxError):
            return text
    try:
        value = _literal(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{key} expects a {type(current).__name__} literal, got {text!r}") from None
    if not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key} expects a {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
    """Set each `(dotted key, text)` in order; unknown keys and unreadable values raise ConfigError."""
    for key, text in overrides:
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--config.{key}: malformed key")
        try:
            current = _lookup(cfg, key)
        except KeyError:
            raise _unknown_key(cfg, key) from None
        value = parse_value(key, text, current)
        parent, _, last = key.rpartition(".")
        node = _lookup(cfg, parent) if parent else cfg
        try:
            with node.unlocked():
                node[last] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def _usage(prog: str, flags: Mapping[str, str | None], cfg=None) -> str:
    extra = "".join(f" [--{n} VALUE]" for n in flags)
    lines = [f"usage: {prog} [--config FILE[:ARG]] [--config.KEY VALUE ...]{extra}"]
    if cfg is not None:
        lines.append("config fields (current values):")
        lines += [f"  --config.{k} {v!r}" for k, v in flat_items(cfg)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str], *, default_config: str | Path, flags: Mapping[str, str | None] | None = None,
               search_dirs: Sequence[Path | str] = (), prog: str = "train.py"
               ) -> tuple[ml_collections.ConfigDict, dict[str, str | None]]:
    """Parse `--config`, `--config.KEY` and the plain `flags`; see the module docstring."""
    flags = dict(flags or {})
    values = dict(flags)
    spec = str(default_config)
    overrides: list[tuple[str, str]] = []
    want_help = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help", "-help", "--helpfull"):
            want_help = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; {_usage(prog, flags)}")
        name, eq, text = arg[2:].partition("=")
        is_config = name == "config" or name.startswith("config.")
        if not is_config and name not in flags:
            close = difflib.get_close_matches(name, ["config", *flags], n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; {_usage(prog, flags)}"
            raise ConfigError(f"unknown flag --{name}{hint}")
        if not eq:
            if i >= len(args):
                raise ConfigError(f"--{name} needs a value")
            text = args[i]
            i += 1
        if name == "config":
            spec = text
        elif is_config:
            overrides.append((name[len("config."):], text))
        else:
            values[name] = text
    cfg = load_config(spec, search_dirs)
    if want_help:
        print(_usage(prog, flags, cfg))
        raise SystemExit(0)
    apply_overrides(cfg, overrides)
    cfg.lock()  # later typos in code (cfg.lr_rate) raise instead of adding a field
    return cfg, values


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def _conditions(rule: str) -> list[tuple[str, float]]:
    out = []
    for part in rule.split(","):
        part = part.strip()
        op = next(o for o in sorted(_OPS, key=len, reverse=True) if part.startswith(o))
        out.append((op, float(part[len(op):])))
    return out


def _describe(conds) -> str:
    return " and ".join(f"{op} {int(v) if float(v).is_integer() else v}" for op, v in conds)


def _numbers(key: str, value) -> Iterable[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield key, value
    elif isinstance(value, (list, tuple)):
        for i, x in enumerate(value):
            yield from _numbers(f"{key}[{i}]", x)


def validate(cfg: ml_collections.ConfigDict, rules: Mapping[str, str] = DEFAULT_RULES,
             choices: Mapping[str, Sequence[str]] = DEFAULT_CHOICES) -> None:
    """Raise ConfigError for the first non-finite number, broken rule or value outside its choices."""
    for key, value in flat_items(cfg):
        for name, x in _numbers(key, value):
            if not math.isfinite(x):
                raise ConfigError(f"--config.{name} must be a finite number, got {x}")
            rule = next((r for pattern, r in rules.items() if fnmatch.fnmatchcase(key, pattern)), None)
            if rule is not None:
                conds = _conditions(rule)
                if not all(_OPS[op](x, v) for op, v in conds):
                    raise ConfigError(f"--config.{name} must be {_describe(conds)}, got {x}")
        if isinstance(value, str):
            for pattern, allowed in choices.items():
                if fnmatch.fnmatchcase(key, pattern) and value not in allowed:
                    raise ConfigError(f"--config.{key} must be one of {', '.join(allowed)}; got {value!r}")


def distributed_config() -> ml_collections.ConfigDict:
    """The `distributed` group of a training config (`turbojax.distributed`; default: one process).

    coordinator_address  process 0's HOST:PORT (GPU hosts; with num_processes > 1 and this process's process_id)
    num_processes / process_id / local_device_ids   the explicit set-up (local_device_ids: this process's devices)
    auto                 let jax detect the cluster (Cloud TPU VMs, GKE, SLURM, Open MPI); also implied when the
                         environment names several processes (TPU_WORKER_HOSTNAMES, SLURM_STEP_NUM_TASKS, ...)
    timeout_s            how long processes wait for each other to join
    """
    return ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                          local_device_ids=(), auto=False, timeout_s=300.0))


def check_workdir(path: str | Path | None, flag: str = "--workdir") -> Path:
    """Absolute workdir path; an empty value, an existing non-folder or a file on the way is an error. Creates
    nothing (the run creates it once the model and trainables are built)."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{flag} is empty; give a folder for checkpoints and outputs")
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} exists and is not a folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return p

