"""``peft-kernel finetune``: train an adapter of any installed method on a causal LM.

The loop is deliberately plain (AdamW, short linear warm-up then a constant learning
rate, gradient clipping at 1.0) and *stateless between steps*: the batch of step ``s`` is
drawn from a generator seeded with ``(seed, s)``, so a run resumed at step ``s`` sees
exactly the batches an uninterrupted run would have seen.

Device placement and multi-process training go through ``accelerate.Accelerator``:
the same command runs on CPU, on one GPU, or under ``accelerate launch`` / ``torchrun``
(data parallel; only the main process writes).
"""

from __future__ import annotations

import json
import math
import os
import time

from ._common import (
    CLIError,
    build_method_config,
    check_output_dir,
    default_method_name,
    require,
    resolve_method,
    staged_output,
)
from ._models import DEFAULT_MODEL, check_model_arg, load_model, load_texts, load_tokenizer

DEFAULTS = dict(steps=200, lr=2e-2, batch_size=16, seq_len=64, seed=0)
DEFAULT_OUTPUT = "peft-kernel-adapter"
WARMUP_STEPS = 10
MAX_GRAD_NORM = 1.0
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FORMAT = 1
#: training settings that a resumed run takes from trainer_state.json unless given again
RESUMABLE = ("model", "data", "lr", "batch_size", "seq_len", "seed")


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


_number.__name__ = "number"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a causal LM with any installed PEFT method",
        description="Train an adapter on a causal language model and save it in Hugging Face PEFT's format "
                    "(adapter_config.json + adapter_model.safetensors), plus the trainer state for --resume. "
                    "Without --model and --data it trains the built-in tiny model on the shipped sentences, offline.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help=f"local transformers model directory, or '{DEFAULT_MODEL}' (built-in tiny Llama; "
                                   "the default)")
    g.add_argument("--data", help="JSONL file with a \"text\" field per line, or a text file with one example per "
                                  "line (default: the shipped tiny_sentences.jsonl)")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="method name, case-insensitive (see `peft-kernel plugins`); default: "
                                    "$PEFT_KERNEL_METHOD, else the only installed method")
    g.add_argument("--r", type=int, help="rank (the method's `r` option)")
    g.add_argument("--alpha", type=_number, help="scaling (the method's `alpha` or `*_alpha` option)")
    g.add_argument("--target-modules", metavar="NAMES",
                   help="comma-separated module names (suffix match), or all-linear")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any config option; VALUE is JSON (r=4, bias='\"all\"', target_modules='[\"q_proj\"]'); "
                        "repeatable")
    g.add_argument("--config", metavar="JSON", help="JSON file of config options (an adapter_config.json works)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help=f"total optimizer steps (default {DEFAULTS['steps']})")
    g.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULTS['lr']})")
    g.add_argument("--batch-size", type=int, help=f"examples per step and process (default {DEFAULTS['batch_size']})")
    g.add_argument("--seq-len", type=int, help=f"examples are cut to this many tokens (default {DEFAULTS['seq_len']})")
    g.add_argument("--seed", type=int, help=f"seed for adapter init and batch order (default {DEFAULTS['seed']})")
    g.add_argument("--log-every", type=int, metavar="N", help="print the mean loss every N steps (default: steps/10)")
    g.add_argument("--save-every", type=int, default=0, metavar="N", help="also save a resumable checkpoint every "
                                                                          "N steps (default: only at the end)")
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"adapter directory (default ./{DEFAULT_OUTPUT})")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in --output up to --steps (settings come from its trainer_state.json)")
    p.set_defaults(func=run)


# -- argument resolution (cheap; before any heavy import) -------------------------------


def _read_state(output: str) -> dict:
    from .. import io

    if os.path.isdir(output):
        with io.locked(output, exclusive=True):
            io.recover(output)  # a save that was killed after it committed is completed first
    path = os.path.join(output, STATE_FILE)
    if not os.path.isfile(path):
        raise CLIError(f"nothing to resume: {path!r} not found (was {output!r} written by peft-kernel finetune?)")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CLIError(f"{path!r} is not valid JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state.get("format") != STATE_FORMAT:
        raise CLIError(f"{path!r} is not a peft-kernel trainer state (format {STATE_FORMAT})")
    if not os.path.isfile(os.path.join(output, OPTIMIZER_FILE)):
        raise CLIError(f"nothing to resume: {os.path.join(output, OPTIMIZER_FILE)!r} not found")
    return state


def _resolve_args(args) -> dict | None:
    """Fill defaults (from the saved state when resuming) and validate; returns the state."""
    state = None
    if args.resume:
        if args.overwrite:
            raise CLIError("--resume and --overwrite contradict each other; pick one")
        state = _read_state(args.output)
        fixed = [flag for flag, value in (("--method", args.method), ("--r", args.r), ("--alpha", args.alpha),
                                          ("--target-modules", args.target_modules), ("--option", args.option),
                                          ("--config", args.config)) if value]
        if fixed:
            raise CLIError(f"{', '.join(fixed)} cannot be changed when resuming: the adapter config comes from "
                           f"{args.output!r}")
        for name in RESUMABLE:
            if getattr(args, name) is None:
                setattr(args, name, state.get(name))
        if args.steps is None:
            args.steps = state.get("steps")
        if state["step"] >= args.steps:
            raise CLIError(
                f"{args.output!r} is already at step {state['step']}; pass a larger --steps to train further"
            )
    else:
        check_output_dir(args.output, overwrite=args.overwrite)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.model = args.model or DEFAULT_MODEL
    for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2)):
        if getattr(args, name) < low:
            raise CLIError(f"--{name.replace('_', '-')} must be at least {low}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise CLIError("--lr must be a positive number")
    if args.log_every is not None and args.log_every < 1 or args.save_every < 0:
        raise CLIError("--log-every must be at least 1 and --save-every at least 0")
    check_model_arg(args.model)
    return state


def _method_config(args):
    method = args.method
    if method is None and args.config:
        from ._common import load_json_object

        method = load_json_object(args.config, "config file").get("peft_type")
    spec = resolve_method(method or default_method_name())
    return spec, build_method_config(spec, config_file=args.config, r=args.r, alpha=args.alpha,
                                     target_modules=args.target_modules, options=args.option, task_type="CAUSAL_LM")


# -- training ----------------------------------------------------------------------------


def _batch(encoded, step: int, args, rank: int, world: int, pad_id: int):
    import torch

    generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) % (2**63))
    picks = torch.randint(len(encoded), (args.batch_size * world,), generator=generator)
    seqs = [encoded[i] for i in picks[rank * args.batch_size:(rank + 1) * args.batch_size].tolist()]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, seq in enumerate(seqs):
        t = torch.tensor(seq, dtype=torch.long)
        input_ids[row, : len(seq)] = t
        attention_mask[row, : len(seq)] = 1
        labels[row, : len(seq)] = t
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lr_at(step: int, lr: float) -> float:
    return lr * min(1.0, (step + 1) / WARMUP_STEPS)


def _rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _launched_without_accelerator(torch) -> bool:
    """True under torchrun & co. on a machine without GPU: accelerate then needs ``cpu=True``
    to set up CPU data parallelism (``accelerate launch --cpu`` sets it itself); otherwise
    every process would train and write alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    api = getattr(torch, "accelerator", None)
    has_accelerator = api.is_available() if api is not None else torch.cuda.is_available()
    return not has_accelerator


def run(args) -> int:
    state = _resolve_args(args)
    texts = load_texts(args.data)
    config = None
    if state is None:
        config = _method_config(args)[1]
    require("finetune", "transformers", "accelerate")

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .. import PeftModel, get_peft_model

    accelerator = Accelerator(cpu=_launched_without_accelerator(torch))
    main = accelerator.is_main_process
    if args.model == DEFAULT_MODEL and accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the tiny model is too small to gain from intra-op threads; they only add waiting
    set_seed(args.seed)
    base = load_model(args.model)
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    tokenizer = load_tokenizer(args.model, vocab)
    encoded = [ids[: args.seq_len] for ids in map(tokenizer.encode, texts)]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise CLIError("no example is long enough to train on (each needs at least 2 tokens)")
    if vocab is not None and max(max(ids) for ids in encoded) >= vocab:
        raise CLIError(f"the tokenizer produces ids beyond the model's vocabulary ({vocab}); they do not match")

    if state is not None:
        model = PeftModel.from_pretrained(base, args.output, is_trainable=True)
    else:
        model = get_peft_model(base, config)
    model.train()
    peft_type = model.peft_type
    if main:
        print(f"method {peft_type} on {args.model} | {len(encoded)} examples | device {accelerator.device}"
              + (f" x{accelerator.num_processes}" if accelerator.num_processes > 1 else ""))
        model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CLIError(f"the {peft_type} adapter has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    history: list = []
    if state is not None:
        blob = torch.load(os.path.join(args.output, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        _set_rng_state(blob["rng"])
        start = state["step"]
        history = list(state.get("loss_history", []))

    def save(step: int, loss: float | None) -> None:
        accelerator.wait_for_everyone()
        if main:
            with staged_output(args.output) as tmp:
                accelerator.unwrap_model(model).save_pretrained(tmp)
                torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state()},
                           os.path.join(tmp, OPTIMIZER_FILE))
                trainer_state = {
                    "format": STATE_FORMAT, "step": step, "steps": args.steps, "peft_type": peft_type,
                    "model": args.model, "data": os.path.abspath(args.data) if args.data else None,
                    "tokenizer": tokenizer.name, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
                    "seq_len": args.seq_len, "world_size": accelerator.num_processes, "loss": loss,
                    "loss_history": history,
                }
                with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
                    json.dump(trainer_state, fh, indent=2)
                    fh.write("\n")
        accelerator.wait_for_everyone()

    log_every = args.log_every or max(1, args.steps // 10)
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=args.steps, initial=start, desc="finetune", unit="step", disable=not main, dynamic_ncols=True)
    began, window, loss_value = time.perf_counter(), [], None
    for step in range(start, args.steps):
        batch = {k: v.to(accelerator.device) for k, v in
                 _batch(encoded, step, args, rank, world, tokenizer.pad_token_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args.lr)
        loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = (accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach()).item()
        if not math.isfinite(step_loss):
            raise CLIError(f"the loss became {step_loss} at step {step + 1}; lower --lr")
        window.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        done = step + 1
        if done % log_every == 0 or done == args.steps:
            mean = sum(window) / len(window)
            history.append([done, round(mean, 5)])
            loss_value = mean
            if main:
                bar.write(f"step {done:>{len(str(args.steps))}}/{args.steps}  loss {mean:.4f}")
            window = []
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done, sum(window) / len(window) if window else loss_value)
    bar.close()
    save(args.steps, loss_value)
    if main:
        took = time.perf_counter() - began
        print(f"saved {peft_type} adapter to {args.output} (step {args.steps}, loss {loss_value:.4f}, "
              f"{args.steps - start} steps in {took:.1f}s)")
    return 0
