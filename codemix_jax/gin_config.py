"""Parsing gin files and bindings with errors that name the bad file or binding."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

import gin
import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules whose gin configurables experiment files may bind; imported before parsing.
CONFIGURABLE_MODULES = (
    "codemix_jax.data",
    "codemix_jax.init_from",
    "codemix_jax.metrics",
    "codemix_jax.model",
    "codemix_jax.optim",
    "codemix_jax.sharding",
    "codemix_jax.stages",
    "codemix_jax.train",
)


class GinConfigError(ValueError):
    """A gin file or binding that does not parse or names an unknown configurable/parameter."""


def parse(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parse ``gin_files`` then ``bindings`` (later ones win).

    ``include`` paths resolve against the working directory and the repository root, so
    ``include 'gin/models/tiny.gin'`` works from anywhere.
    """
    for path in gin_files:
        if not os.path.isfile(path) and not os.path.isfile(os.path.join(REPO_ROOT, path)):
            raise GinConfigError(f"gin file not found: {path!r}")
    for module in CONFIGURABLE_MODULES:
        importlib.import_module(module)
    for search_path in (os.getcwd(), REPO_ROOT):
        gin.add_config_file_search_path(search_path)
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [_resolve(path) for path in gin_files], bindings, finalize_config=False
        )
    except (ValueError, KeyError, SyntaxError, OSError) as error:
        raise GinConfigError(
            f"invalid gin config (files {list(gin_files)}, bindings {list(bindings)}): {error}"
        ) from error


REQUIRED = object()  # ``bound``'s default: an unbound selector is an error


def bound(selector: str, *, what: str, default: Any = REQUIRED) -> Any:
    """The value gin will inject for ``selector`` in the parsed config, references and macros
    (``%IT_BATCH``) evaluated; ``default`` if unbound, else a ValueError naming ``what``."""
    try:
        value = gin.query_parameter(selector)
    except ValueError as error:
        if default is REQUIRED:
            raise ValueError(f"{what}: its gin config does not bind {selector}") from error
        return default
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def _resolve(path: str) -> str:
    return path if os.path.isfile(path) else os.path.join(REPO_ROOT, path)


def write_operative_config(run_dir: str) -> None:
    """Record the parameters actually used, next to the run's outputs (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
