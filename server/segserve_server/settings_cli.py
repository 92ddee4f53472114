"""`segserve serve`'s flags, built from the `Settings` fields: name, type, default and help.

A field `foo_bar` is the flag `--foo-bar` (a list field may name its repeatable flag in
`json_schema_extra={"flag": ...}`); its help is the field's docstring, followed by its default
and its environment variable, so nothing here repeats a setting by hand.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from segserve_server.settings import Settings

__all__ = ["add_settings_flags", "flag_of", "overrides_of"]

OFF = "off"
_METAVARS: dict[Any, str] = {int: "N", float: "SECONDS", Path: "PATH", str: "TEXT"}


def flag_of(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra
    custom = extra.get("flag") if isinstance(extra, dict) else None
    return f"--{custom or name.replace('_', '-')}"


def _optional_port(text: str) -> int | str:
    """A port number, or "off" (kept as the string: overrides_of reads it as None)."""
    return OFF if text.lower() == OFF else int(text)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without Annotated[...] and `| None`; and whether None was allowed."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _default_text(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        return ""
    default = field.default
    if default is None:
        return f"default: {OFF}"
    if isinstance(default, bool):
        return f"default: {'on' if default else 'off'}"
    return f"default: {default}"


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; a flag not given leaves the setting to the environment,
    the TOML file or the field's default (every flag defaults to None)."""
    for name, field in Settings.model_fields.items():
        kind, optional = _unwrap(field.annotation)
        notes = [n for n in (_default_text(name, field), f"env SEGSERVE_{name.upper()}") if n]
        help_text = f"{(field.description or '').strip()} ({'; '.join(notes)})"
        help_text = help_text.replace("%", "%%")
        options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        origin = typing.get_origin(kind)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            options.update(action="append", metavar="VALUE")
        elif origin is Literal:
            choices = list(typing.get_args(kind))
            options["choices"] = choices
            if all(isinstance(c, str) and c.isupper() for c in choices):
                options["type"] = str.upper  # as the setting's own validator: debug is DEBUG
        elif kind is int and optional:
            options.update(type=_optional_port, metavar=f"N|{OFF}")
        elif kind in _METAVARS:
            options.update(type=kind, metavar=_METAVARS[kind])
        else:
            raise TypeError(f"setting {name} has a type the CLI cannot parse: {kind}")
        parser.add_argument(flag_of(name, field), **options)


def overrides_of(args: argparse.Namespace) -> dict[str, object]:
    """The settings the flags gave ("off" as None), to pass to load_settings."""
    overrides: dict[str, object] = {}
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = None if value == OFF else value
    return overrides
