"""Dataclasses as option sets: one source of names, defaults and help for Python, CLI and files.

A field made with `option()` becomes a flag (`add_arguments`), a key of `--config FILE`
(`load_config_file`, YAML or JSON) and a keyword of the dataclass. Flags given on the command
line override the file, which overrides the defaults (`build_config`). Nothing here knows about
training or generation; it is the generic machinery the config modules use.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from compinv.errors import CompinvError

# Python argument names whose flag is not simply `--` + the name with dashes.
FLAG_NAMES = {"runs": "--concept", "embedding_files": "--embeddings", "boxes": "--box"}


def flag_for(name: str) -> str:
    """The CLI flag of a Python argument name: the one place the two spellings meet."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help (and argparse extras such as `choices`).

    `aliases=[...]` keeps old flag spellings working after a rename; `internal=True` marks a
    field the run fills itself (never a flag or a file key).
    """
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def user_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a user sets (flags, file keys); internal ones are filled by the run."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _base_type(tp: Any) -> Any:
    """The scalar type of an annotation such as `int`, `str | None` or `list[str]`."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per user field; defaults are None so we can tell what was given."""
    hints = typing.get_type_hints(cls)
    for f in user_fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        names = [flag_for(f.name), *meta.pop("aliases", [])]
        tp = _base_type(hints[f.name])
        if tp is bool and f.name.startswith("no_"):
            # BooleanOptionalAction stores False for any flag spelled --no-…, so --no-anchor
            # would silently keep the anchor: a negative option is a plain switch.
            parser.add_argument(*names, dest=f.name, default=None, action="store_const",
                                const=True, help=help_text)
            continue
        if tp is bool:
            parser.add_argument(*names, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f" (default: {default})" if default not in (None, []) else ""
        parser.add_argument(*names, dest=f.name, type=tp, default=None,
                            help=help_text + shown, **meta)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _type_ok(value: Any, tp: type) -> bool:
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if tp is float else isinstance(value, tp)


def _checked(value: Any, hint: Any, choices: Any, where: str) -> Any:
    """`value` from a config file, type-checked exactly as the field declares it.

    YAML would happily give "false" for a bool, 3.9 for an int or a mapping for a prompt; each
    of those is refused with the expected type, instead of being converted into something else.
    """
    if value is None:
        return None
    if typing.get_origin(_unwrap_optional(hint)) is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise CompinvError(f"{where} must be a string or a list of strings, got {value!r}")
        return list(items)
    tp = _base_type(hint)
    if not _type_ok(value, tp):
        raise CompinvError(f"{where} must be {_EXPECTED[tp]}, got {value!r}")
    if choices and value not in choices:
        raise CompinvError(f"{where} {value!r}: use one of {', '.join(map(str, choices))}")
    return float(value) if tp is float else value


def _coerce(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in user_fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise CompinvError(f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        out[name] = _checked(value, hints[name], fields[name].metadata.get("choices"),
                             f"{source}: key {key!r}")
    return out


MAX_FILE_BYTES = 1 << 20  # a settings file is a few KB; anything this large is not one


def read_yaml(path: Path, argument: str, fix: str) -> Any:
    """Parse a YAML (or JSON, a subset of YAML) file given as `argument`, with one-line errors.

    The file must be UTF-8 text of at most 1 MiB, and YAML aliases are refused: a few KB of
    nested aliases can expand to gigabytes.
    """
    if not path.is_file():
        raise CompinvError(f"`{argument}` {path}: file not found; {fix}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CompinvError(f"`{argument}` {path}: {size} bytes, more than a settings file needs "
                           f"(limit {MAX_FILE_BYTES}); {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompinvError(f"`{argument}` {path}: not a text file (not UTF-8); {fix}") from exc
    try:
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise CompinvError(f"`{argument}` {path}: YAML aliases (*name) are not accepted; write "
                               "the values out")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CompinvError(f"`{argument}` {path}: not valid YAML or JSON ({exc})") from exc
    if data is None:
        raise CompinvError(f"`{argument}` {path}: the file is empty; {fix}")
    return data


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    data = read_yaml(path, "config", "pass a YAML or JSON file of option names and values")
    if not isinstance(data, dict):
        raise CompinvError(f"`config` {path}: must hold a mapping of option names to values")
    return data


def build_config(cls: type, args: argparse.Namespace, config_file: str | None = None) -> Any:
    """Dataclass defaults, then the config file, then the flags actually given."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_coerce(cls, load_config_file(config_file), f"`config` {config_file}"))
    for f in user_fields(cls):
        given = getattr(args, f.name, None)
        if given is not None and given != []:
            values[f.name] = given
    return cls(**values)
