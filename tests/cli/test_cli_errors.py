"""Bad input: one line on stderr, exit status 2, no traceback, nothing half-written.

The cases the CLI promises (missing model, malformed data line, unknown method, existing
output) run as real subprocesses; the wider matrix of option checks calls ``main()`` in
process to keep the suite fast — it is the same code path minus interpreter start-up."""

from __future__ import annotations

import json

import pytest
from cli_helpers import call_cli, fails_cleanly, ok, run_cli


def test_missing_model_dir(tmp_path):
    fails_cleanly(run_cli("finetune", "--method", "lora", "--model", tmp_path / "nope", "--output", tmp_path / "o"),
                  "model directory", "not found")
    (tmp_path / "empty").mkdir()
    fails_cleanly(call_cli("finetune", "--model", tmp_path / "empty", "--output", tmp_path / "o"), "no config.json")


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "broken', "not valid JSON"),
    ('{"txt": "wrong field"}', 'a "text" field'),
    ('{"text": 3}', "must be a string"),
    ("[1, 2]", 'a "text" field'),
])
def test_malformed_jsonl_names_the_line(tmp_path, bad_line, message):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n\n' + bad_line + '\n{"text": "fine"}\n')
    cli = run_cli if bad_line.startswith('{"text": "broken') else call_cli
    line = fails_cleanly(cli("finetune", "--method", "lora", "--data", data, "--output", tmp_path / "o"),
                         "line 3", message)
    assert str(data) in line


def test_missing_or_empty_data(tmp_path):
    fails_cleanly(call_cli("finetune", "--method", "lora", "--data", tmp_path / "x.jsonl", "--output", tmp_path / "o"),
                  "not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    fails_cleanly(call_cli("finetune", "--method", "lora", "--data", tmp_path / "empty.txt", "--output",
                          tmp_path / "o"), "no examples")


def test_unknown_method_says_how_to_get_it(tmp_path):
    line = fails_cleanly(run_cli("finetune", "--method", "no-such", "--output", tmp_path / "o"),
                         "NO_SUCH", "no known plugin does", "register_peft_method")
    assert "pip install" not in line  # never a guessed package name
    line = fails_cleanly(run_cli("finetune", "--method", "vera", "--output", tmp_path / "o",
                                 env={"PEFT_KERNEL_DISABLE_PLUGINS": "vera"}), "VERA", "installed but not loaded")


@pytest.mark.parametrize("args, message", [
    (["--option", "r"], "key=value"),
    (["--option", "nonsense=1"], "has no option 'nonsense'"),
    (["--r", "0"], "invalid LORA options"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_bad_method_or_training_options(tmp_path, args, message):
    fails_cleanly(call_cli("finetune", "--method", "lora", *args, "--output", tmp_path / "o"), message)
    assert not (tmp_path / "o").exists()


def test_bad_config_file(tmp_path):
    config = tmp_path / "c.json"
    config.write_text("[1]")
    fails_cleanly(call_cli("finetune", "--method", "lora", "--config", config, "--output", tmp_path / "o"),
                  "JSON object")
    config.write_text(json.dumps({"peft_type": "SOMETHING", "r": 2}))
    fails_cleanly(call_cli("finetune", "--method", "lora", "--config", config, "--output", tmp_path / "o"),
                  "is for SOMETHING")


def test_existing_output_is_refused_then_replaced_atomically(tmp_path, trained):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails_cleanly(run_cli("finetune", "--method", "lora", "--steps", "1", "--output", out), "already exists",
                  "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    # a run that fails after it started (a target that matches nothing) leaves the old directory alone
    fails_cleanly(call_cli("finetune", "--method", "lora", "--steps", "1", "--target-modules", "no_such_layer",
                          "--overwrite", "--output", out), "no_such_layer")
    assert (out / "precious.txt").read_text() == "keep me"
    ok(run_cli("finetune", "--method", "lora", "--steps", "1", "--batch-size", "2", "--overwrite", "--output", out))
    assert not (out / "precious.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fails_cleanly(call_cli("finetune", "--method", "lora", "--output", trained / "adapter_config.json"), "is a file")


def test_staged_output_never_leaves_half_written_output(tmp_path):
    from peft_kernel.cli._common import staged_output

    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(str(final)) as tmp:
            (tmp_path / tmp / "new.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with staged_output(str(final)) as tmp:
        (tmp_path / tmp / "new.txt").write_text("complete")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_kernel_cli_names_no_method():
    """The CLI is kernel code: it resolves methods through the registry only."""
    import pathlib
    import re

    import peft_kernel

    root = pathlib.Path(peft_kernel.__file__).parent
    banned = re.compile(r"lora|vera|\bia3\b|bitsandbytes|\bbnb\b|torchao|gptq|\bhqq\b", re.IGNORECASE)
    # the one exception, by design: the table of first-party distributions behind install hints
    # (data, not code; tests/test_plugins.py keeps it equal to what plugins/* register)
    table = root / "data" / "first_party_methods.json"
    for sub in ("cli", "data"):
        for path in (root / sub).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".jsonl", ".txt", ".json") and path != table:
                hits = banned.findall(path.read_text(encoding="utf-8"))
                assert not hits, f"{path} names {sorted(set(hits))}"
