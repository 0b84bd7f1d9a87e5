"""``peft-kernel merge``: the saved model is plain transformers and equals the merged PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import call_cli, default_model, fails_cleanly, ok, run_cli, sample_ids

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_one_adapter_equals_merged_peft_model(tmp_path, trained):
    from peft_kernel import PeftModel

    out = tmp_path / "merged"
    result = ok(run_cli("merge", "default", trained, "--output", out))
    assert "merged 1 LORA adapter" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    ids = sample_ids()
    peft_model = PeftModel.from_pretrained(default_model(), str(trained)).eval()
    expected = _logits(peft_model, ids)
    assert torch.allclose(_logits(loaded, ids), expected, atol=1e-5)
    assert torch.allclose(_logits(peft_model.merge_and_unload(), ids), expected, atol=1e-5)
    hf_peft = pytest.importorskip("peft")
    hf = hf_peft.PeftModel.from_pretrained(default_model(), str(trained)).merge_and_unload().eval()
    assert torch.allclose(_logits(loaded, ids), _logits(hf, ids), atol=1e-5)


def test_merge_several_adapters_with_weights(tmp_path, trained, trained_b):
    """``cat`` is exact for low-rank deltas: merged = base + w1·Δ1 + w2·Δ2."""
    from peft_kernel import PeftModel

    out = tmp_path / "merged"
    ok(run_cli("merge", "default", trained, trained_b, "--weights", "0.7", "-1.5", "--combination", "cat",
               "--output", out))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = default_model().state_dict()
    deltas = []
    for path in (trained, trained_b):
        single = PeftModel.from_pretrained(default_model(), str(path)).merge_and_unload().state_dict()
        deltas.append({k: single[k] - base[k] for k in base})
    changed = 0
    for key, value in base.items():
        expected = value + 0.7 * deltas[0][key] - 1.5 * deltas[1][key]
        assert torch.allclose(merged[key], expected, atol=1e-6), key
        changed += not torch.equal(merged[key], value)
    assert changed == 6  # q and v of trained, q and o of trained_b, 2 layers: q, v, o per layer


def test_merge_bad_input(tmp_path, trained):
    fails_cleanly(run_cli("merge", tmp_path / "no-model", trained, "--output", tmp_path / "o"), "not found")
    fails_cleanly(call_cli("merge", "default", tmp_path / "no-adapter", "--output", tmp_path / "o"),
                  "adapter directory", "not found")
    fails_cleanly(call_cli("merge", "default", trained, trained, "--weights", "1", "--output", tmp_path / "o"),
                  "--weights has 1 values for 2 adapters")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    fails_cleanly(call_cli("merge", "default", trained, "--output", tmp_path / "exists"), "--overwrite")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "x"
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((trained / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SOMETHING_ELSE"}))
    fails_cleanly(call_cli("merge", "default", trained, other, "--output", tmp_path / "o"), "different methods")
    fails_cleanly(call_cli("merge", "default", other, "--output", tmp_path / "o"), "SOMETHING_ELSE",
                  "no known plugin does")
    fails_cleanly(call_cli("merge", "default", trained, trained, "--combination", "nope", "--output",
                          tmp_path / "o"), "Unknown combination_type")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
