"""Checks `twinkle serve` and `twinkle check-config` run before anything starts.

Each problem becomes one readable line (file:line:column for YAML, `field.path: message` for the
schema, the tenants named for shared keys, what to do for a model that cannot load), so a first
run fails in a second with something to act on rather than a traceback from a Ray worker.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from twinkle.config import ModelConfig, ServerConfig, load_config
from twinkle.model_source import ModelSource, ModelSourceError, check_model_source


class PreflightError(Exception):
    """The configuration cannot run; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


def yaml_error_line(path: str | Path, exc: yaml.YAMLError) -> str:
    """`file:line:column: problem (context)` for a YAML syntax error; lines and columns count from 1."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = ""
        if exc.context:
            where = exc.context_mark
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            context = f" ({exc.context}{at})"
        return f"{path}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {exc.problem}{context}"
    return f"{path}: YAML syntax error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def validation_error_lines(exc: ValidationError) -> list[str]:
    """One `field.path: message` line per schema error, instead of pydantic's multi-line dump."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(error["loc"])
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{path}: {message}")
    return lines


def _unknown_key_message(loc: tuple) -> str:
    """Name the closest known key of the section the unknown one sits in."""
    section: type[BaseModel] | None = ServerConfig
    skip_key = False
    for part in loc[:-1]:
        if section is None or skip_key or not isinstance(part, str):
            skip_key = False  # list indices and dict keys (tenant names) keep the section's model
            continue
        field = section.model_fields.get(part)
        section = _model_in(field.annotation) if field else None
        skip_key = field is not None and typing.get_origin(field.annotation) is dict
    known = sorted(section.model_fields) if section else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; this section takes {', '.join(known)}" if known else "unknown key"


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `ModelConfig`, `list[ModelConfig]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def load_checked(path: str | None = None, **overrides) -> ServerConfig:
    """Load and validate a config (YAML, schema, API keys from the config and the environment)."""
    prefix = f"{path}: " if path else ""
    try:
        config = load_config(path, **overrides)
    except FileNotFoundError:
        raise PreflightError([f"{prefix}no such file"]) from None
    except OSError as exc:
        raise PreflightError([f"{prefix}cannot read it ({exc.strerror or exc})"]) from None
    except yaml.YAMLError as exc:
        raise PreflightError([yaml_error_line(path or "config", exc)]) from None
    except ValidationError as exc:
        raise PreflightError([prefix + line for line in validation_error_lines(exc)]) from None
    except ValueError as exc:
        raise PreflightError([f"{prefix}{exc}"]) from None
    try:
        config.resolved_keys()
        config.check_secure()
    except ValueError as exc:
        raise PreflightError([f"{prefix}{exc}"]) from None
    return config


def check_models(config: ServerConfig) -> list[ModelSource]:
    """Every configured model's source, or a PreflightError with one line per model that cannot load."""
    sources, problems = [], []
    for model in config.models:
        try:
            sources.append(check_model_source(model.source))
        except ModelSourceError as exc:
            problems.append(f"models[{model.name}]: {exc}" if model.path else str(exc))
            continue
        if model.backend == "megatron":
            problems.extend(_megatron_layout_problems(model, sources[-1]))
    if problems:
        raise PreflightError(problems)
    return sources


def _megatron_layout_problems(model: ModelConfig, source: ModelSource) -> list[str]:
    """TP and PP against the model's heads, MLP and layers, when its config can be read now."""
    from twinkle.backends.megatron.layout import model_dims, parallel_problems

    folder = source.where if source.kind in ("local", "hub-cached") else None
    dims = model_dims(model.source, folder)
    if dims is None:
        return []
    par = model.parallelism
    return [f"models[{model.name}].parallelism: {line}"
            for line in parallel_problems(dims, par.tensor_parallel, par.pipeline_parallel)]
