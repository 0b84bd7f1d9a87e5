"""contrib/lora_lstm: a user-written LoRA layer for nn.LSTM, registered with one call."""

import subprocess
import sys

import pytest
import torch
from _contrib import CONTRIB, load
from torch import nn

import peft_kernel
from peft_kernel.testing import Case, MethodConformance
from peft_plugin_lora import LoraConfig

lora_lstm = load("lora_lstm/lora_lstm.py", "contrib_lora_lstm")
example = load("lora_lstm/example.py", "contrib_lora_lstm_example")
LoraLSTM = lora_lstm.LoraLSTM


@pytest.fixture
def lstm_mapping():
    peft_kernel.register_layer_mapping(nn.LSTM, LoraLSTM, method="LORA")
    try:
        yield
    finally:
        peft_kernel.unregister_layer_mapping(nn.LSTM, method="LORA")


class Tagger(nn.Module):
    """LSTM over a sequence, linear head per step; the LSTM's output is a tuple."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


@pytest.mark.usefixtures("lstm_mapping")
class TestLoraLSTMConformance(MethodConformance):
    cases = [
        Case("lstm", Tagger, lambda: LoraConfig(target_modules=["lstm"], r=2, lora_alpha=4),
             lambda: torch.randn(3, 5, 6)),
        Case("lstm-and-head", Tagger,
             lambda: LoraConfig(target_modules=["lstm", "head"], r=4, init_lora_weights="gaussian"),
             lambda: torch.randn(3, 5, 6)),
    ]


def test_unregistered_lstm_is_refused_with_advice():
    with pytest.raises(ValueError, match="register_layer_mapping") as info:
        peft_kernel.get_peft_model(Tagger(), LoraConfig(target_modules=["lstm"]))
    assert "LSTM" in str(info.value)


def test_adapted_lstm_equals_an_lstm_with_the_updated_weights(lstm_mapping):
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(Tagger(), LoraConfig(target_modules=["lstm"], r=2, init_lora_weights=False))
    layer = model.base_model.model.lstm
    assert isinstance(layer, LoraLSTM) and repr(layer).startswith("lora.")
    x, h0 = torch.randn(2, 4, 6), (torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    reference = nn.LSTM(6, 8, batch_first=True)
    reference.load_state_dict(layer.base_layer.state_dict())
    d_ih, d_hh = layer.deltas("default")
    with torch.no_grad():
        reference.weight_ih_l0 += d_ih
        reference.weight_hh_l0 += d_hh
        out, (h, c) = layer(x, h0)
        ref_out, (ref_h, ref_c) = reference(x, h0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(c, ref_c)


def test_config_level_registration(lstm_mapping, tmp_path):
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(Tagger(), LoraConfig(target_modules=["lstm"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    peft_kernel.unregister_layer_mapping(nn.LSTM, method="LORA")
    config = LoraConfig.from_pretrained(tmp_path)
    config.register_custom_module({nn.LSTM: LoraLSTM})
    torch.manual_seed(0)
    loaded = peft_kernel.PeftModel.from_pretrained(Tagger(), tmp_path, config=config)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_example_trains_saves_and_reloads(tmp_path):
    result = example.main(str(tmp_path))
    assert result["losses"][-1] < result["losses"][0] * 0.5
    assert "base_model.model.lstm.lora_B_hh.default.weight" in result["trainable"]
    assert "register_layer_mapping" in result["error_without_mapping"]
    assert result["max_reload_diff"] <= 1e-6 and result["max_merge_diff"] <= 1e-5
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.head.bias", "base_model.model.head.weight",
                    "base_model.model.lstm.lora_A.weight", "base_model.model.lstm.lora_A_hh.weight",
                    "base_model.model.lstm.lora_B.weight", "base_model.model.lstm.lora_B_hh.weight"]
    assert float(load_file(tmp_path / "adapter_model.safetensors")["base_model.model.lstm.lora_B_hh.weight"]
                 .abs().sum()) > 0, "the LSTM adapter did not train"


def test_example_script_runs(tmp_path):
    result = subprocess.run([sys.executable, str(CONTRIB / "lora_lstm" / "example.py"), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reloaded max |diff|" in result.stdout
