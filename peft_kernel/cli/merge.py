"""``peft-kernel merge``: fold adapters into a base model and save a plain transformers model.

One adapter is merged with ``merge_and_unload``. Multiple adapters (of one method) are
first combined into one with the tuner's ``add_weighted_adapter`` — the combination
strategies are whatever the installed plugins register — and the result is merged.
"""

from __future__ import annotations

import json
import os
import time

from ._common import CLIError, check_output_dir, parse_option, require, staged_output
from ._models import DEFAULT_MODEL, check_model_arg, has_tokenizer_files, load_model
from .inspect import CONFIG_NAME

MERGED_NAME = "merged"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge adapters into a base model and save it as a plain transformers model",
        description="Merge one adapter into BASE, or combine multiple adapters of the same method with "
                    "add_weighted_adapter and merge the result. Saves a transformers model (safetensors) "
                    "that needs neither peft nor peft-kernel to load.",
    )
    p.add_argument("base", metavar="BASE", help=f"local transformers model directory, or '{DEFAULT_MODEL}' "
                                                "(the built-in tiny model finetune uses)")
    p.add_argument("adapters", metavar="ADAPTER", nargs="+", help="adapter directories")
    p.add_argument("--output", "-o", required=True, help="directory for the merged model")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one weight per adapter (default 1.0 each); combines via add_weighted_adapter")
    p.add_argument("--combination", metavar="TYPE",
                   help="add_weighted_adapter combination_type (default: the method's own default); "
                        "see `peft-kernel plugins` for the installed types")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra add_weighted_adapter argument, JSON value (density=0.5, svd_rank=8); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def _check_inputs(args) -> list[dict]:
    check_model_arg(args.base)
    configs = []
    for path in args.adapters:
        if not os.path.isdir(path):
            raise CLIError(f"adapter directory {path!r} not found")
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise CLIError(f"{path!r} is not an adapter directory (no {CONFIG_NAME})")
        try:
            with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as fh:
                configs.append(json.load(fh))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CLIError(f"{os.path.join(path, CONFIG_NAME)!r} is not valid JSON") from None
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise CLIError(f"--weights has {len(args.weights)} values for {len(args.adapters)} adapters")
    types = sorted({str(c.get("peft_type")) for c in configs})
    if len(types) > 1:
        raise CLIError(f"the adapters use different methods ({', '.join(types)}); merge them one at a time, "
                       "each into the result of the previous merge")
    check_output_dir(args.output, overwrite=args.overwrite)
    for path in args.adapters:
        if os.path.abspath(path) == os.path.abspath(args.output):
            raise CLIError("--output must not be one of the adapters")
    return configs


def run(args) -> int:
    configs = _check_inputs(args)
    options = dict(parse_option(o) for o in args.option)
    combine = len(args.adapters) > 1 or args.weights is not None or args.combination is not None or bool(options)

    from .. import MergeNotSupportedError, PeftModel
    from ._common import resolve_method

    spec = resolve_method(str(configs[0].get("peft_type")))  # unknown method: names the plugin to install
    require("merge", "transformers")
    if spec.is_prompt_learning:
        raise CLIError(f"{spec.peft_type} adapters are prompts, not weight updates; they cannot be merged into a model")
    began = time.perf_counter()
    _say(f"loading base model {args.base}", began)
    base = load_model(args.base, configs[0].get("task_type"), configs[0].get("auto_mapping"))
    names = [f"adapter_{i}" for i in range(len(args.adapters))]
    model = None
    for name, path in zip(names, args.adapters, strict=True):
        _say(f"loading adapter {path}", began)
        if model is None:
            model = PeftModel.from_pretrained(base, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    merge_names = names
    if combine:
        add_weighted = getattr(model.base_model, "add_weighted_adapter", None)
        if add_weighted is None:
            raise CLIError(
                f"{spec.peft_type} adapters cannot be combined: its plugin ({spec.source}) provides no "
                "add_weighted_adapter; merge one adapter at a time, each into the result of the previous merge"
            )
        weights = args.weights if args.weights is not None else [1.0] * len(names)
        kwargs = dict(options)
        if args.combination is not None:
            kwargs["combination_type"] = args.combination
        described = args.combination or "default"
        _say(f"combining {len(names)} adapter(s) with weights {weights} ({described} combination)", began)
        try:
            add_weighted(names, weights, MERGED_NAME, **kwargs)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"cannot combine the {spec.peft_type} adapters: {exc}") from None
        model.set_adapter(MERGED_NAME)
        merge_names = [MERGED_NAME]
    _say("merging", began)
    try:
        merged = model.merge_and_unload(progressbar=True, adapter_names=merge_names)
    except MergeNotSupportedError as exc:
        raise CLIError(f"{spec.peft_type} adapters cannot be merged here: {exc}") from None
    _say(f"saving to {args.output}", began)
    with staged_output(args.output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if args.base != DEFAULT_MODEL and has_tokenizer_files(args.base):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(args.base).save_pretrained(tmp)
    how = "combined and merged" if combine else "merged"
    print(f"{how} {len(args.adapters)} {spec.peft_type} adapter(s) into {args.base}; saved a transformers model "
          f"to {args.output} ({time.perf_counter() - began:.1f}s)")
    return 0


def _say(message: str, began: float) -> None:
    print(f"[{time.perf_counter() - began:5.1f}s] {message}", flush=True)
