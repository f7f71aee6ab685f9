"""One table of options: every user-settable option is a dataclass field that carries its own description.

A field declared with :func:`opt` holds its help text, its kind (what values it takes), its validity check and its
CLI flag. From that one declaration:

- the dataclass validates itself at construction (:func:`validate`, called from ``__post_init__``), raising a
  ValueError that names the field, the value and the allowed range;
- ``cli.py`` generates the click option (the only place that imports click);
- ``batch.py`` accepts the field name as a TOML key and refuses any key that is not an option.

So a new option appears everywhere at once. The pattern follows Polygraphy's reusable argument groups and
coremltools' ``from_dict`` with extra keys forbidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

KINDS = ("int", "float", "str", "choice", "bool", "floats", "path")


@dataclass(frozen=True)
class Option:
    """The description of one option (stored in the dataclass field's metadata under ``"axcnn"``)."""

    help: str
    kind: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None  # for non-None values; kind and choices are checked anyway
    allowed: str = ""  # the allowed range, as said in the error message
    optional: bool = False  # None is a valid value
    flag: str | None = None  # CLI flag; None: derived from the field name (kmin -> --kmin, batch_size -> --batch-size)
    cli: bool = True  # offered on the compress command line
    metavar: str | None = None
    default_text: str | None = None  # how the CLI help states the default (when it is not the field's default)

    def describe_allowed(self) -> str:
        if self.allowed:
            return self.allowed
        if self.kind == "choice":
            return " | ".join(self.choices)
        return {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
                "floats": "a list of numbers", "path": "a file path"}[self.kind]


def opt(default: Any, help: str, kind: str, *, choices: tuple[str, ...] = (),
        check: Callable[[Any], bool] | None = None, allowed: str = "", optional: bool | None = None,
        flag: str | None = None, cli: bool = True, metavar: str | None = None,
        default_text: str | None = None) -> Any:
    """A dataclass field described as an option (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed {' | '.join(KINDS)}")
    if optional is None:
        optional = default is None
    meta = Option(help=help, kind=kind, choices=tuple(choices), check=check, allowed=allowed, optional=optional,
                  flag=flag, cli=cli, metavar=metavar, default_text=default_text)
    return field(default=default, metadata={"axcnn": meta})


def option_of(f: Field) -> Option | None:
    return f.metadata.get("axcnn")


def option_fields(cls_or_instance) -> list[tuple[Field, Option]]:
    """(field, Option) for every option field of a dataclass, in declaration order."""
    return [(f, o) for f in fields(cls_or_instance) if (o := option_of(f)) is not None]


def cli_flag(f: Field, o: Option) -> str:
    return o.flag or "--" + f.name.replace("_", "-")


def _kind_ok(value: Any, o: Option) -> bool:
    if o.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if o.kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    if o.kind == "bool":
        return isinstance(value, bool)
    if o.kind in ("str", "path"):
        return isinstance(value, str)
    if o.kind == "choice":
        return isinstance(value, str) and value in o.choices
    if o.kind == "floats":
        return (isinstance(value, tuple) and len(value) > 0
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    return False


def check_value(name: str, value: Any, o: Option) -> None:
    """Raise ValueError naming the field, the value and the allowed range when ``value`` is not valid."""
    if value is None:
        if o.optional:
            return
        raise ValueError(f"{name}={value!r} is invalid: allowed {o.describe_allowed()}")
    if not _kind_ok(value, o) or (o.check is not None and not o.check(value)):
        allowed = o.describe_allowed() + (" or None" if o.optional else "")
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def validate(instance) -> None:
    """Check every option field of a dataclass instance (call from ``__post_init__``)."""
    for f, o in option_fields(instance):
        check_value(f.name, getattr(instance, f.name), o)


def coerce(name: str, value: Any, o: Option) -> Any:
    """A value from a loosely typed source (TOML, JSON) in the field's kind: ints are accepted for floats, lists
    for float lists. Anything else is returned unchanged for :func:`check_value` to judge."""
    if value is None:
        return None
    if o.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if o.kind == "floats":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        if isinstance(value, (list, tuple)):
            return tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    return value


def from_mapping(cls, values: Mapping[str, Any], where: str = "") -> Any:
    """Build the dataclass ``cls`` from ``values``, refusing a key that is not one of its options by name."""
    known = {f.name: o for f, o in option_fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        at = f" in {where}" if where else ""
        raise ValueError(f"unknown option {unknown[0]!r}{at}; known options: {', '.join(sorted(known))}")
    return cls(**{k: coerce(k, v, known[k]) for k, v in values.items()})


def defaults(cls) -> dict[str, Any]:
    return {f.name: (None if f.default is MISSING else f.default) for f, _ in option_fields(cls)}


# common checks ---------------------------------------------------------------------------------------------------

def at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: v >= lo


def between(lo: float, hi: float, *, open_low: bool = False, open_high: bool = False) -> Callable[[Any], bool]:
    def check(v):
        return (v > lo if open_low else v >= lo) and (v < hi if open_high else v <= hi)

    return check
