"""Parse and validate ``name[:key=value,...]`` spec strings before any rank starts."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from hpcdl.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One parameter of a spec: its type, default and allowed range."""

    type: type
    default: Any = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its name and every parameter, defaults filled in."""

    name: str
    params: dict[str, Any]

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format(v)}" for k, v in self.params.items())


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _convert(kind: str, name: str, key: str, raw: str, param: Param) -> Any:
    where = f"{kind} {name!r}, parameter {key}={raw!r}"
    if param.type is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"Invalid {where}: expected true or false.")
    if param.type is str:
        if param.choices and raw not in param.choices:
            raise ConfigError(f"Invalid {where}: expected one of {', '.join(param.choices)}.")
        return raw
    try:
        value = param.type(raw)
    except ValueError:
        raise ConfigError(f"Invalid {where}: expected {'an integer' if param.type is int else 'a number'}.") from None
    if param.min is not None and (value < param.min or (param.min_exclusive and value == param.min)):
        bound = f"> {param.min}" if param.min_exclusive else f">= {param.min}"
        raise ConfigError(f"Invalid {where}: must be {bound}.")
    if param.max is not None and value > param.max:
        raise ConfigError(f"Invalid {where}: must be <= {param.max}.")
    return value


def parse_spec(text: str, kind: str, schemas: dict[str, dict[str, Param]]) -> Spec:
    """Parse ``name[:key=value,...]`` against the known names and their parameters.

    Args:
        text: the spec, for example ``"local-sgd:period=8,warmup=100"``.
        kind: what is being parsed, for messages ("strategy", "compression").
        schemas: parameter schema per known name.

    Raises:
        ConfigError: unknown name or key, a malformed pair, or a value of the wrong
            type or out of range. The message names the value and the valid choices.
    """
    text = str(text).strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in schemas:
        raise ConfigError(
            f"Unknown {kind} {name!r}.{_suggest(name, list(schemas))} "
            f"Valid {kind} names: {', '.join(schemas)}.")
    schema = schemas[name]
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not raw.strip():
            raise ConfigError(f"Invalid {kind} spec {text!r}: {item!r} is not key=value.")
        if key not in schema:
            valid = ", ".join(schema) or "none"
            raise ConfigError(
                f"{kind.capitalize()} {name!r} has no parameter {key!r}.{_suggest(key, list(schema))} "
                f"Valid parameters: {valid}.")
        values[key] = _convert(kind, name, key, raw.strip(), schema[key])
    for key, param in schema.items():
        if key not in values:
            if param.required:
                raise ConfigError(f"{kind.capitalize()} {name!r} needs {key}=..., for example {name}:{key}=1.")
            values[key] = param.default
    return Spec(name, values)
