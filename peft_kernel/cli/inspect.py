"""``peft-kernel inspect``: what an adapter directory holds, without loading a model.

Reads ``adapter_config.json`` as plain JSON and only the header of
``adapter_model.safetensors``, so it works even when the method's plugin is not
installed — it then says which plugin to install.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter

from ._common import CLIError, alpha_field, human_size

CONFIG_NAME = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: safetensors dtype codes -> torch dtype names
ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
MODEL_PREFIX = "base_model.model."


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a saved adapter (method, targets, rank, size, plugin needed)",
                       description="Describe an adapter directory: method, target modules, rank, parameter count, "
                                   "weight file size and dtypes, and the plugin needed to load it.")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="directory with adapter_config.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


#: bytes per element of the safetensors dtypes whose data size inspect checks
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors_header(path: str) -> dict[str, dict]:
    """``{name: {"dtype": ..., "shape": [...]}}`` from a safetensors file's header only.

    The header is checked against the file: every tensor's byte range must lie inside the
    data and hold exactly ``numel × itemsize`` bytes, so a header that lies is an error."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(fh.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        tensors = {name: _checked_entry(name, info, size - 8 - length) for name, info in header.items()}
    except (ValueError, OSError, RecursionError) as exc:
        raise CLIError(f"{path!r} is not a readable safetensors file ({exc})") from None
    return tensors


def _checked_entry(name: str, info, data_size: int) -> dict:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise ValueError(f"tensor {name!r} has no dtype")
    dtype = info["dtype"]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        raise ValueError(f"tensor {name!r} has byte offsets {offsets!r} outside the data ({data_size} bytes)")
    if dtype in ST_ITEMSIZE and offsets[1] - offsets[0] != _prod(shape) * ST_ITEMSIZE[dtype]:
        raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} does not match its "
                         f"{offsets[1] - offsets[0]} bytes of data")
    return {"dtype": ST_DTYPES.get(dtype, dtype.lower()), "shape": shape}


def _read_bin(path: str) -> dict[str, dict]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling problem is a bad file
        raise CLIError(f"{path!r} is not a readable torch weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path!r} does not hold a dict of named tensors; it is not an adapter checkpoint")
    return {str(k): {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in state.items()}


def _adapted_modules(names, prefix: str) -> tuple[list[str], list[str]]:
    """Module paths that carry adapter tensors, and tensor names outside any adapter layer."""
    modules, other = [], []
    for name in names:
        parts = name[len(MODEL_PREFIX):].split(".") if name.startswith(MODEL_PREFIX) else name.split(".")
        for i, part in enumerate(parts):
            if part.startswith(prefix):
                module = ".".join(parts[:i])
                if module not in modules:
                    modules.append(module)
                break
        else:
            other.append(name)
    return modules, other


def describe(path: str) -> dict:
    if not os.path.isdir(path):
        raise CLIError(f"adapter directory {path!r} not found")
    from .. import io

    try:
        with io.locked(path):  # config and weights of one save
            return _describe(path)
    except ValueError as exc:  # an unreadable save journal
        raise CLIError(str(exc)) from None


def _describe(path: str) -> dict:
    from .. import io

    config_path = io.committed_path(path, CONFIG_NAME) or os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        hint = f"; it holds adapters in subdirectories: {', '.join(subs)}" if subs else ""
        raise CLIError(f"{path!r} is not an adapter directory (no {CONFIG_NAME}){hint}")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CLIError(f"{config_path!r} is not valid JSON") from None
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise CLIError(f"{config_path!r} has no peft_type")
    peft_type = str(config["peft_type"])

    from ..plugins import distribution_for, manager

    spec = manager().methods().get(peft_type)
    prefix = spec.prefix if spec is not None else peft_type.lower() + "_"

    weight_paths = {f: io.committed_path(path, f) for f in WEIGHT_FILES}
    weights_file = next((f for f, p in weight_paths.items() if p and os.path.isfile(p)), None)
    tensors: dict[str, dict] = {}
    if weights_file is not None:
        full = weight_paths[weights_file]
        tensors = read_safetensors_header(full) if weights_file.endswith(".safetensors") else _read_bin(full)
    numel = {name: _prod(info["shape"]) for name, info in tensors.items()}
    dtypes = Counter()
    for name, info in tensors.items():
        dtypes[info["dtype"]] += numel[name]
    modules, other = _adapted_modules(tensors, prefix)
    alpha_key = alpha_field(config)
    rank_keys = sorted(k for k, v in config.items() if (k == "r" or k.endswith("_r")) and isinstance(v, int))
    total_size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    trainer_state = None
    state_path = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state_path):
        try:
            with open(state_path, encoding="utf-8") as fh:
                raw = json.load(fh)
            trainer_state = {k: raw.get(k) for k in ("step", "steps", "loss", "model", "seed")}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            trainer_state = None
    target_modules = config.get("target_modules")
    return {
        "path": os.path.abspath(path),
        "peft_type": peft_type,
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "peft_version": config.get("peft_version"),
        "target_modules": sorted(target_modules, key=str) if isinstance(target_modules, list) else target_modules,
        "adapted_modules": modules,
        "num_adapted_modules": len(modules),
        "other_tensors": other,
        "r": config.get("r"),
        "rank_fields": {k: config[k] for k in rank_keys},
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha": config.get(alpha_key) if alpha_key else None,
        "alpha_field": alpha_key,
        "parameters": sum(numel.values()),
        "tensors": len(tensors),
        "dtypes": dict(sorted(dtypes.items())),
        "weights_file": weights_file,
        "file_size": os.path.getsize(weight_paths[weights_file]) if weights_file else 0,
        "total_size": total_size,
        "plugin": _providing_distribution(spec) if spec is not None else distribution_for(peft_type),
        "plugin_installed": spec is not None,
        "provided_by": spec.source if spec is not None else None,
        "trainer_state": trainer_state,
    }


def _providing_distribution(spec) -> str | None:
    from ..plugins import manager

    record = {r.name: r for r in manager().plugin_info()}.get(spec.source)
    return record.distribution if record is not None else None


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def run(args) -> int:
    info = describe(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = info["target_modules"]
    targets = ", ".join(map(str, targets)) if isinstance(targets, list) else (targets if targets is not None else "-")
    rank = info["r"] if info["r"] is not None else (", ".join(f"{k}={v}" for k, v in info["rank_fields"].items())
                                                     or "-")
    if info["rank_pattern"]:
        rank = f"{rank} (per-module: {json.dumps(info['rank_pattern'])})"
    dtypes = ", ".join(f"{d} ({n:,d})" for d, n in info["dtypes"].items()) or "-"
    if info["plugin_installed"]:
        plugin = f"{info['plugin'] or 'registered from code'} — installed (plugin {info['provided_by']!r})"
    else:
        from ..plugins import manager

        plugin = f"NOT available: {manager().provider_hint(info['peft_type'])}"
    rows = [
        ("adapter", info["path"]),
        ("method", info["peft_type"]),
        ("task type", info["task_type"] or "-"),
        ("base model", info["base_model_name_or_path"] or "-"),
        ("target modules", targets),
        ("adapted modules", f"{info['num_adapted_modules']}"
         + (f" ({', '.join(info['adapted_modules'][:4])}{', ...' if info['num_adapted_modules'] > 4 else ''})"
            if info["adapted_modules"] else "")),
        ("rank", rank),
        ("alpha", f"{info['alpha']} ({info['alpha_field']})" if info["alpha_field"] else "-"),
        ("parameters", f"{info['parameters']:,d} in {info['tensors']} tensors"),
        ("dtypes", dtypes),
        ("weights", f"{info['weights_file']} ({human_size(info['file_size'])})" if info["weights_file"]
         else "none (no adapter_model.safetensors)"),
        ("directory size", human_size(info["total_size"])),
        ("plugin", plugin),
        ("format", info["peft_version"] or "-"),
    ]
    if info["trainer_state"]:
        ts = info["trainer_state"]
        loss = f", loss {ts['loss']:.4f}" if isinstance(ts.get("loss"), (int, float)) else ""
        rows.append(("trained", f"{ts.get('step')} steps{loss} (resumable with finetune --resume)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
