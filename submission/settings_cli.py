"""Settings machinery of submission/main.py: dataclass fields as flags, JSON settings files, layering and checks.

Shipped beside main.py (which imports it from its own folder); it knows nothing of landmarks. A settings section
is a frozen dataclass whose fields are made with `setting()`; main.py defines the sections, this file turns them
into an argparse parser, reads them from JSON, checks their ranges and layers defaults < task defaults < preset <
file < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import stat
from dataclasses import field, fields
from pathlib import Path


class InputError(Exception):
    """A problem with the inputs: printed as one line, exit status 2."""


def setting(default, help_text: str, **checks):
    """A settings field: its default, its --help and its checks (minimum, above, maximum, below, choices,
    required, repeat: a tuple flag given once per value, as --model A --model B)."""
    return field(default=default, metadata={"help": help_text, **checks})


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose own errors (a bad value, a missing flag) are an InputError: one `error: ...` line and exit
    status 2 like every other error of the script, without the usage block."""

    def error(self, message: str):
        needs_value = re.fullmatch(r"argument (--[\w-]+).*: expected one argument", message)
        if needs_value:  # a value that starts with '-' (--shard -1/2) reads as a flag
            message += f" (a value that starts with '-' is written {needs_value[1]}=VALUE)"
        raise InputError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is a tuple) of a settings field, from its annotation."""
    kind = str(f.type).removesuffix(" | None")
    names = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path}
    if kind.startswith("tuple["):
        return names[kind.removeprefix("tuple[").split(",")[0]], True
    return names[kind], False


def build_parser(description: str, sections: list[type], task_defaults: dict[str, dict]) -> argparse.ArgumentParser:
    """One flag per settings field, its help naming its default and any task's own. Unset flags stay out of the
    result, so the layers below them show through."""
    parser = ArgumentParser(description=description)
    for cls in sections:
        group = parser.add_argument_group(cls.__name__.lower(), cls.__doc__)
        for f in fields(cls):
            kind, is_tuple = field_type(f)
            meta = f.metadata
            options = {"default": argparse.SUPPRESS, "help": meta["help"]}
            if meta.get("required"):
                options["required"] = True
            elif f.default is not None:
                shown = " ".join(map(str, f.default)) if is_tuple else f.default
                options["help"] += (
                    f" (default: {shown}"
                    + "".join(
                        f"; {task}: {values[f.name]}" for task, values in task_defaults.items() if f.name in values
                    )
                    + ")"
                )
            if kind is bool:
                options["action"] = argparse.BooleanOptionalAction
            else:
                options["type"] = kind
                options["choices"] = meta.get("choices")
                if meta.get("repeat"):
                    options["action"] = "append"
                else:
                    options["nargs"] = "+" if is_tuple else None
            group.add_argument(flag(f.name), **options)
    return parser


RECORD_KEYS = ("run", "sources", "versions", "plan", "about")  # a run's record's and a tune's other top-level keys


def read_settings_file(path: Path, sections: dict[str, type]) -> dict:
    """{setting: value} from a JSON file of sections ({"verification": {...}, ...}); the other top-level keys a
    run's WORK/settings.json or a tune's file hold (RECORD_KEYS) are ignored. An unknown key, at the top or in a
    section, and a key given twice are errors naming it."""
    where = f"--settings {path}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise InputError(f"{where}: not a regular file")
        content = json.loads(Path(path).read_text(), object_pairs_hook=lambda pairs: unique_keys(pairs, where))
    except OSError as err:
        raise InputError(f"{where}: cannot read it ({err.strerror})") from None
    except RecursionError:
        raise InputError(f"{where}: not a settings file (JSON nested too deeply)") from None
    except ValueError as err:
        raise InputError(f"{where}: not JSON ({err})") from None
    if not isinstance(content, dict):
        raise InputError(f"{where}: expected an object of sections {', '.join(sections)}")
    section_of = {f.name: section for section, cls in sections.items() for f in fields(cls)}
    for key in content:
        if key not in sections and key not in RECORD_KEYS:
            home = (
                f" (a setting of '{section_of[key]}': put it inside that section)"
                if key in section_of
                else closest(key, [*sections, *RECORD_KEYS])
            )
            raise InputError(f"{where}: unknown top-level key '{key}'{home}; the sections are {', '.join(sections)}")
    values = {}
    for section, cls in sections.items():
        given = content.get(section, {})
        known = {f.name: f for f in fields(cls)}
        if not isinstance(given, dict):
            raise InputError(f"{where}: '{section}' must be an object")
        for name, value in given.items():
            if name not in known:
                home = f" (it belongs in '{section_of[name]}')" if name in section_of else closest(name, known)
                raise InputError(f"{where}: unknown setting '{section}.{name}'{home}")
            values[name] = coerce(known[name], value, f"{where}: '{section}.{name}'")
    return values


def unique_keys(pairs: list[tuple[str, object]], where: str) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an InputError (json.loads keeps the last silently)."""
    content = {}
    for key, value in pairs:
        if key in content:
            raise InputError(f"{where}: key '{key}' is given twice in one object")
        content[key] = value
    return content


def closest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the choice closest to name, or '' when none is close."""
    close = difflib.get_close_matches(name.lower(), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def coerce(f: dataclasses.Field, value, where: str):
    """value as the field's type (a JSON number for a float, a list for a tuple); InputError naming `where`."""
    kind, is_tuple = field_type(f)
    if value is None and "None" in str(f.type):
        return None

    def fits(item) -> bool:
        if kind is bool or isinstance(item, bool):
            return kind is bool and isinstance(item, bool)
        return isinstance(item, (int, float) if kind is float else str if kind is Path else kind)

    items = value if is_tuple and isinstance(value, list) else [value]
    if (is_tuple and not (isinstance(value, list) and value)) or not all(fits(item) for item in items):
        expected = f"a non-empty list of {kind.__name__}" if is_tuple else kind.__name__
        raise InputError(f"{where} must be {expected}, got {shown(repr(value))}")
    try:
        items = [kind(item) for item in items]
    except OverflowError:  # an integer beyond any float
        raise InputError(f"{where} is out of range, got {shown(value)}") from None
    return tuple(items) if is_tuple else items[0]


BOUNDS = (
    ("minimum", lambda v, b: v >= b, ">="),
    ("above", lambda v, b: v > b, ">"),
    ("maximum", lambda v, b: v <= b, "<="),
    ("below", lambda v, b: v < b, "<"),
)


def check_settings(section, sources: dict | None = None) -> None:
    """Every number finite and within its field's bounds: one InputError naming the flag (and the settings file
    when the value came from one: sources as layer_settings gives them)."""
    for f in fields(section):
        value, meta = getattr(section, f.name), f.metadata
        for item in value if isinstance(value, tuple) else [value]:
            if item is None or isinstance(item, (bool, str, Path)):
                continue
            source = (sources or {}).get(f.name, "")
            origin = f" (from the {source})" if source.startswith("file ") else ""
            if isinstance(item, float) and not math.isfinite(item):
                raise InputError(f"{flag(f.name)} must be a finite number, got {item}{origin}")
            for key, holds, sign in BOUNDS:
                if key in meta and not holds(item, meta[key]):
                    raise InputError(f"{flag(f.name)} must be {sign} {meta[key]}, got {shown(item)}{origin}")


def shown(value) -> str:
    """A value for an error line: at most 40 characters (a JSON integer may have thousands of digits)."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def layer_settings(
    given: dict,
    presets: dict[str, dict],
    sections: dict[str, type],
    file_sections: dict[str, type],
    task_defaults: dict[str, dict],
) -> tuple[dict, dict]:
    """({section name: checked section}, {setting: where its value came from}) from parsed flags: the defaults,
    then the task's own defaults, then the preset, then the --settings file (read with file_sections), then the
    flags."""
    values, sources = {}, {}
    task = given.get("task")
    layers = [
        ("task default " + task, task_defaults[task]) if task_defaults.get(task) else None,
        ("preset " + given["preset"], presets[given["preset"]]) if given.get("preset") else None,
        ("file " + str(given["settings"]), read_settings_file(given["settings"], file_sections))
        if given.get("settings")
        else None,
        ("command line", given),
    ]
    for source, layer in filter(None, layers):
        values.update(layer)
        sources.update({name: source for name in layer})
    built = {}
    for name, cls in sections.items():
        section = cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        section = dataclasses.replace(
            section,
            **{
                f.name: tuple(getattr(section, f.name))
                for f in fields(cls)
                if isinstance(getattr(section, f.name), list)
            },
        )
        check_settings(section, sources)
        built[name] = section
    return built, sources


def parse_shard(text: str) -> tuple[int, int]:
    """--shard i/n as (i, n): the i-th of n slices."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return index, count
