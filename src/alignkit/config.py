"""Job configuration: a dataclass per job ← YAML file ← `key=value` overrides. Field docs are the string
literal under each field (PEP 257), printed by `--help`. Required fields are checked at build time, so a
config can nest in a larger one that fills it; bad keys and values raise `ConfigError` (CLI exit code 2)."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import os
import resource
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .data import write_atomic


class ConfigError(ValueError):
    """A bad configuration value, file or key. The message names where."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def high_water_mb(reset: bool = False) -> float | None:
    """Linux's resident high-water mark (VmHWM) in MB, first reset to the current RSS if `reset`; else None."""
    with contextlib.suppress(OSError, StopIteration):
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM")) / 1024
    return None


@contextlib.contextmanager
def output_lock(path: str):
    """Hold `path` (a job's output folder or file) for the job's life: an flock on a file under
    $ALIGNKIT_CACHE/locks, so it dies with its process. Another holder: ConfigError naming its pid."""
    home = Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit")) / "locks"
    home.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    with open(home / f"{name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ConfigError(
                f"{path} is in use by another alignkit job ({f.read() or 'a running process'}): "
                "wait for it to end, or choose another output"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield  # closing the file releases the lock


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its dataclass bases (a subclass's own docstring wins)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(doc, str):
            docs[node.target.id] = " ".join(doc.split())
    return docs


def inline(cls: type) -> Any:
    """A section with its keys at the parent's level (`seed=1`, not `run.seed=1`) in YAML and overrides."""
    return dataclasses.field(default_factory=cls, metadata={"inline": True})


def _inline_sections(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("inline")}


def _keys(cls: type) -> set[str]:
    """The keys a config takes at its own level: its fields, inline sections replaced by their keys."""
    inl = _inline_sections(cls)
    own = {f.name for f in dataclasses.fields(cls) if f.name not in inl}
    return own.union(*(_keys(t) for t in inl.values()))


def _nest_inline(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the keys of inline sections moved under the sections' field names."""
    out = dict(values)
    for name, tp in _inline_sections(cls).items():
        moved = {k: out.pop(k) for k in list(out) if k in _keys(tp)}
        if moved and not isinstance(out.get(name) or {}, dict):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {out[name]!r}")
        if moved:
            out[name] = {**(out.get(name) or {}), **moved}
    return out


def _required(f: dataclasses.Field) -> bool:
    return f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_config(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _scalar(value: Any, tp: type, key: str) -> Any:
    """bool, int, float or str from YAML or an override's text; ConfigError naming the key otherwise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str) or number:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if (tp is int and isinstance(value, int) and not isinstance(value, bool)) or (tp is float and number):
        return tp(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return tp(value)
    raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _union(value: Any, args: tuple, key: str) -> Any:
    """The first member type of a union (X | None) the value converts to."""
    null = value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~"))
    if null and type(None) in args:
        return None
    errors = []
    for arg in [a for a in args if a is not type(None)]:
        try:
            return _coerce(value, arg, key)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{key}: cannot be null")


def _coerce(value: Any, tp: Any, key: str, inline: bool = False) -> Any:
    """Convert a YAML/override value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(value, typing.get_args(tp), key)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp in (bool, int, float, str):
        return _scalar(value, tp, key)
    if _is_config(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key if inline else f"{key}.")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Make `cls` from a (nested) mapping. Unknown keys and wrong types raise `ConfigError`."""
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    values, kwargs = _nest_inline(cls, values), {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}' (known: {', '.join(sorted(_keys(cls)))})")
        factory = fields[key].default_factory
        if _is_config(hints[key]) and isinstance(value, dict) and factory is not dataclasses.MISSING:
            # a partly given section keeps the job's own defaults for it (e.g. SFT's train.lr)
            value = _deep_merge(dataclasses.asdict(factory()), value)
        section = "" if fields[key].metadata.get("inline") else key
        kwargs[key] = _coerce(value, hints[key], prefix + section, inline=not section)
    # a required field given as an empty string ("data=") is as good as missing
    given = {k for k, v in kwargs.items() if v != "" or not _required(fields[k])}
    if missing := [f.name for f in fields.values() if _required(f) and f.name not in given]:
        doc = field_docs(cls).get(missing[0], "")
        raise ConfigError(f"{prefix}{missing[0]} is required" + (f" ({doc})" if doc else ""))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _set_nested(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
        tree = node
    tree[parts[-1]] = value


def _parse_value(text: str) -> Any:
    """Parse an override's right-hand side as YAML scalar/list, keeping plain strings as strings."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except Exception:  # YAMLError, and the constructors' own (`!!int x`, a bad date, deep nesting): a string
        return text
    # "title=a: b" is a string with a colon, not a mapping (sections are set with dots: a.b=value)
    return text if isinstance(value, dict) else value


def load(cls: type, config_file: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Resolve a job config: dataclass defaults ← YAML file ← `a.b=value` overrides."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (yaml.YAMLError, OSError, ValueError, LookupError, AttributeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        tree = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, text = item.split("=", 1)
        if "" in key.strip().split("."):
            raise ConfigError(f"key '{key.strip()}' has an empty part (in {item!r})")
        _set_nested(tree, key.strip(), _parse_value(text))
    if hasattr(cls, "defaults_for"):  # a config whose defaults come from a file it names (a recipe)
        tree = cls.defaults_for(tree)
    return build(cls, tree)


def to_dict(cfg: Any) -> Any:
    """A config as plain data, the way YAML and overrides spell it (inline sections flattened)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            v = to_dict(getattr(cfg, f.name))
            out.update(v) if f.metadata.get("inline") else out.__setitem__(f.name, v)
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def save(cfg: Any, path: str | Path) -> None:
    """The resolved config as YAML (job_config.yaml), written atomically."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


REQUIRED = "(required)"


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, doc) per field, sections flattened with dots, with the job's own defaults."""
    rows, docs, hints = [], field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if default is dataclasses.MISSING:
            factory = f.default_factory
            default = REQUIRED if factory is dataclasses.MISSING else factory()  # type: ignore[misc]
        if _is_config(tp):
            section = prefix if f.metadata.get("inline") else f"{prefix}{f.name}."
            rows += describe(tp, prefix=section, defaults=None if default is REQUIRED else default)
            continue
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        if typing.get_origin(tp) is typing.Literal:
            tname = "|".join(map(str, typing.get_args(tp)))
        shown = default if default is REQUIRED else repr(default)
        rows.append((prefix + f.name, tname, shown, docs.get(f.name, "")))
    return rows


def help_text(cls: type) -> str:
    lines = []
    for key, tname, default, doc in describe(cls):
        lines.append(f"  {key} ({tname}, {'required' if default == REQUIRED else f'default {default}'})")
        lines += ["      " + ln for ln in textwrap.wrap(doc, 90, break_on_hyphens=False)]
    return "\n".join(lines)
