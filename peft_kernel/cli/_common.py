"""Helpers shared by the commands: user errors, output directories, method options.

Nothing here imports transformers or accelerate; commands import them inside their
``run`` functions so that ``import peft_kernel`` (and ``peft-kernel plugins``) stays light.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ENV_DEBUG = "PEFT_KERNEL_DEBUG"
ENV_DEFAULT_METHOD = "PEFT_KERNEL_METHOD"


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def require(command: str, *modules: str) -> None:
    """Fail with an install hint when an optional dependency of ``command`` is missing."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise CLIError(f"`peft-kernel {command}` needs {' and '.join(missing)}: pip install 'peft-kernel[cli]'")


# -- output directories -----------------------------------------------------------------


def check_output_dir(path: str, *, overwrite: bool, allow_existing: bool = False) -> None:
    """Refuse an existing, non-empty output directory unless told otherwise.

    Called before any expensive work, so that a mistake costs nothing.
    """
    if os.path.isfile(path):
        raise CLIError(f"output path {path!r} is a file; give a directory")
    from .. import io

    if os.path.isdir(path) and not (overwrite or allow_existing):
        if any(not io.is_staging_debris(entry) for entry in os.listdir(path)):
            raise CLIError(f"output directory {path!r} already exists; pass --overwrite to replace it")


def staged_output(final: str):
    """``with staged_output(final) as tmp: ... write into tmp ...``: on success the files in
    ``tmp`` become the whole content of ``final``, crash-consistently (:func:`peft_kernel.io.staged`):
    at every instant ``final`` holds the complete old output or the complete new one, and
    never goes missing. On an error ``final`` is untouched. Concurrent writers take turns."""
    from .. import io

    return io.staged(final, replace_all=True)


# -- methods and their options ----------------------------------------------------------


def resolve_method(name: str):
    """The registered :class:`~peft_kernel.plugins.MethodSpec` for a user-typed name."""
    from ..plugins import manager

    peft_type = name.strip().upper().replace("-", "_")
    try:
        return manager().method(peft_type)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def default_method_name() -> str:
    """The method used when ``--method`` is not given.

    ``$PEFT_KERNEL_METHOD`` when set; otherwise the installed method, when exactly one
    layer-wrapping method is installed. The kernel has no built-in favourite.
    """
    from ..plugins import manager

    env = os.environ.get(ENV_DEFAULT_METHOD, "").strip()
    if env:
        return env
    methods = manager().methods()
    wrapping = sorted(t for t, spec in methods.items() if not spec.is_prompt_learning)
    if len(wrapping) == 1:
        return wrapping[0]
    if not methods:
        raise CLIError(
            "no PEFT method is installed; install a method plugin (pip install peft-plugin-<name>), "
            "see `peft-kernel plugins`"
        )
    raise CLIError(
        f"more than one method is installed ({', '.join(sorted(methods))}); choose one with --method "
        f"(or set ${ENV_DEFAULT_METHOD})"
    )


def config_fields(config_cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls) if f.init and not f.name.startswith("_")}


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (``r=4``, ``bias="all"``, ``x=[1,2]``); bare words are strings."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise CLIError(f"--option expects key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def load_json_object(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CLIError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what} {path!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise CLIError(f"{what} {path!r} is not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise CLIError(f"{what} {path!r} must hold a JSON object")
    return data


def alpha_field(fields) -> str | None:
    """The scaling field of a method: ``alpha`` or the single field ending in ``_alpha``."""
    if "alpha" in fields:
        return "alpha"
    candidates = sorted(f for f in fields if f.endswith("_alpha"))
    return candidates[0] if len(candidates) == 1 else None


def build_method_config(spec, *, config_file: str | None = None, r=None, alpha=None,
                        target_modules: str | None = None, options=(), task_type: str | None = None):
    """Build ``spec.config_cls`` from a JSON file, the shortcut flags and ``--option`` pairs
    (later sources win). Unknown option names are an error, not a silent no-op."""
    fields = config_fields(spec.config_cls)
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_json_object(config_file, "config file"))
        file_type = values.pop("peft_type", None)
        if file_type is not None and str(file_type).upper() != spec.peft_type:
            raise CLIError(f"config file {config_file!r} is for {file_type}, but the method is {spec.peft_type}")
        for key in ("peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"):
            values.pop(key, None)
    for text in options:
        key, value = parse_option(text)
        values[key] = value
    if r is not None:
        if "r" not in fields:
            raise CLIError(f"{spec.peft_type} has no rank option `r`; see its options with --option")
        values["r"] = r
    if alpha is not None:
        name = alpha_field(fields)
        if name is None:
            raise CLIError(f"{spec.peft_type} has no alpha option (a field `alpha` or `*_alpha`)")
        values[name] = alpha
    if target_modules is not None:
        if "target_modules" not in fields:
            raise CLIError(f"{spec.peft_type} has no target_modules option")
        values["target_modules"] = parse_target_modules(target_modules)
    if task_type is not None and "task_type" in fields:
        values.setdefault("task_type", task_type)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CLIError(
            f"{spec.peft_type} has no option {', '.join(map(repr, unknown))}; its options are: "
            f"{', '.join(sorted(set(fields) - {'peft_type', 'peft_version', 'auto_mapping'}))}"
        )
    try:
        return spec.config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"invalid {spec.peft_type} options: {exc}") from None


def parse_target_modules(text: str):
    """``q_proj,v_proj`` → a list (suffix match); a single special value such as
    ``all-linear`` stays a string. Use ``--option target_modules='"regex"'`` for a regex."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise CLIError("--target-modules is empty")
    if len(parts) == 1 and parts[0] == "all-linear":
        return parts[0]
    return parts


# -- formatting -------------------------------------------------------------------------


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_table(rows: list[tuple], header: tuple) -> None:
    table = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
