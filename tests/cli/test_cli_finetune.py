"""``peft-kernel finetune``: training, the saved checkpoint, HF PEFT interop, resume."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import FAST, call_cli, default_model, fails_cleanly, load_state, ok, run_cli, sample_ids
from safetensors.torch import load_file


def test_writes_peft_checkpoint_and_trainer_state(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= names
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    state = load_state(trained)
    assert state["step"] == 4 and state["steps"] == 4 and state["seed"] == 0 and state["model"] == "default"
    assert [s for s, _ in state["loss_history"]] == [1, 2, 3, 4]
    blob = torch.load(trained / "optimizer.pt", weights_only=True)
    assert {"optimizer", "rng"} <= set(blob) and blob["optimizer"]["state"]
    stdout = (trained.parent / "stdout.txt").read_text()
    assert "trainable params:" in stdout and "step 4/4" in stdout
    # nothing but the output directory was created next to it (no staging leftovers)
    assert [p.name for p in trained.parent.iterdir() if p.name.startswith(".")] == []


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_hf_peft_with_same_logits(trained):
    peft = pytest.importorskip("peft")
    from peft_kernel import PeftModel

    ids = sample_ids()
    ours = PeftModel.from_pretrained(default_model(), str(trained)).eval()
    hf = peft.PeftModel.from_pretrained(default_model(), str(trained)).eval()
    base = _logits(default_model(), ids)
    assert torch.allclose(_logits(ours, ids), _logits(hf, ids), atol=1e-6)
    assert not torch.allclose(_logits(ours, ids), base, atol=1e-6), "the trained adapter changes nothing"


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path, trained):
    out = tmp_path / "run"
    ok(run_cli("finetune", *FAST, "--steps", "2", "--output", out))
    assert load_state(out)["step"] == 2
    result = ok(run_cli("finetune", "--resume", "--steps", "4", "--output", out))
    state = load_state(out)
    assert state["step"] == 4
    assert [s for s, _ in state["loss_history"]] == [1, 2, 3, 4]
    assert "2 steps in" in result.stdout
    # same batches, optimizer state and RNG: identical to the 4-step run of the `trained` fixture
    resumed = load_file(out / "adapter_model.safetensors")
    straight = load_file(trained / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert state["loss_history"] == load_state(trained)["loss_history"]


def test_resume_refuses_when_nothing_is_left_or_options_change(tmp_path, trained):
    fails_cleanly(run_cli("finetune", "--resume", "--output", trained), "already at step 4", "--steps")
    fails_cleanly(call_cli("finetune", "--resume", "--steps", "6", "--r", "2", "--output", trained),
                  "--r cannot be changed")
    fails_cleanly(call_cli("finetune", "--resume", "--output", tmp_path / "nothing"), "nothing to resume")


def test_method_options_text_data_and_model_dir(tmp_path):
    """--r/--alpha/--target-modules/--option/--config, a .txt data file and a --model directory."""
    model_dir = tmp_path / "model"
    default_model().save_pretrained(model_dir)
    data = tmp_path / "data.txt"
    data.write_text("one two three\n\nfour five six\nthe cat says meow.\n")
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"lora_dropout": 0.1, "bias": "none", "r": 2}))
    out = tmp_path / "out"
    ok(run_cli("finetune", "--method", "LoRA", "--model", model_dir, "--data", data, "--config", config,
               "--r", "4", "--alpha", "16", "--target-modules", "q_proj,k_proj", "--option", "use_rslora=true",
               "--steps", "2", "--batch-size", "2", "--output", out))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["lora_dropout"] == 0.1
    assert saved["use_rslora"] is True and sorted(saved["target_modules"]) == ["k_proj", "q_proj"]
    state = load_state(out)
    assert state["tokenizer"] == "bytes" and state["model"] == str(model_dir)


def test_model_dir_with_its_own_tokenizer(tmp_path):
    """A model directory with tokenizer files is trained with AutoTokenizer; merge keeps the tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from cli_helpers import TINY_TEXTS

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(TINY_TEXTS, tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")
    model_dir = tmp_path / "model"
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=fast.pad_token_id,
                                   eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS))
    out = tmp_path / "adapter"
    ok(run_cli("finetune", "--method", "lora", "--model", model_dir, "--data", data, "--steps", "2",
               "--batch-size", "2", "--output", out))
    assert load_state(out)["tokenizer"] == "auto"
    merged = tmp_path / "merged"
    ok(run_cli("merge", model_dir, out, "--output", merged))
    assert (merged / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(merged)("the cat")["input_ids"]


def _methods():
    from peft_kernel.plugins import manager

    return sorted(set(manager().methods()) - {"LORA"})  # LoRA: the `trained` fixture and most tests


def _layer_methods():
    from peft_kernel.plugins import manager

    return sorted(t for t, spec in manager().methods().items() if not spec.is_prompt_learning)


#: size options that some methods require (no usable default), set whenever a method has the field
SIZE_OPTIONS = {"num_virtual_tokens": 4, "adapter_len": 4, "adapter_layers": 1, "token_indices": "[32,101,116]"}
#: options a method needs to train on the built-in data: CPT's prompt must hold a label (type 4) for
#: the input to become a target, and its corrections room to move
TRAINING_OPTIONS = {"CPT": ["cpt_token_ids=[116,104,101,32]", "cpt_tokens_type_mask=[1,2,3,4]",
                            "opt_projection_epsilon=5", "opt_projection_format_epsilon=5"]}


@pytest.mark.parametrize("method", _methods())
def test_every_installed_method_trains_and_inspects(tmp_path, method):
    """One step for every method; a dozen for prompt-learning methods, whose loss must fall."""
    import dataclasses

    from peft_kernel.plugins import manager

    spec = manager().method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    extra = [arg for name, value in SIZE_OPTIONS.items() if name in fields for arg in ("--option", f"{name}={value}")]
    for option in TRAINING_OPTIONS.get(method, ()):
        extra += ["--option", option]
    steps = ["--steps", "12", "--log-every", "4", "--lr", "0.1"] if spec.is_prompt_learning else ["--steps", "1"]
    out = tmp_path / "out"
    args = ["finetune", "--method", method.lower(), *extra, *steps, "--batch-size", "2", "--seq-len", "16",
            "--output", out]
    result = run_cli(*args)
    if result.returncode == 2 and "target_modules" in result.stderr:  # a method without defaults for Llama
        result = run_cli(*args, "--target-modules", "all-linear")
    ok(result)
    info = json.loads(ok(call_cli("inspect", out, "--json")).stdout)
    assert info["peft_type"] == method and info["plugin_installed"] and info["parameters"] > 0
    if spec.is_prompt_learning:
        losses = [loss for _, loss in load_state(out)["loss_history"]]
        assert losses[-1] < losses[0] - 0.1, losses
        fails_cleanly(call_cli("merge", "default", out, "--output", tmp_path / "m"), "cannot be merged")


def test_defaults_train_and_the_loss_falls(tmp_path):
    """No --method (taken from $PEFT_KERNEL_METHOD), built-in model and data, default lr."""
    out = tmp_path / "out"
    ok(run_cli("finetune", "--steps", "40", "--log-every", "10", "--output", out, env={"PEFT_KERNEL_METHOD": "lora"}))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    losses = [loss for _, loss in load_state(out)["loss_history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses


def test_default_method_is_never_guessed(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_KERNEL_METHOD", raising=False)
    if len(_layer_methods()) > 1:
        fails_cleanly(call_cli("finetune", "--steps", "1", "--output", tmp_path / "x"),
                      "more than one method is installed", "--method")
    monkeypatch.setenv("PEFT_KERNEL_METHOD", "no_such")
    line = fails_cleanly(call_cli("finetune", "--steps", "1", "--output", tmp_path / "x"), "no known plugin does")
    assert "pip install" not in line


def test_torchrun_data_parallel_only_main_process_writes(tmp_path):
    """Two CPU processes under torchrun: one run, one writer, world_size recorded."""
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "peft_kernel.cli", "finetune", *FAST, "--steps", "2", "--output", out],
        capture_output=True, text=True, env=env, timeout=600,
    )
    ok(result)
    assert result.stdout.count("saved LORA adapter") == 1, result.stdout
    state = load_state(out)
    assert state["world_size"] == 2 and state["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
