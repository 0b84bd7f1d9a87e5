"""Each hook family exercised through a small plugin defined right here, the way a
third party would write one."""

import pytest
import torch
from torch import nn

from peft_kernel import PeftModel, get_peft_model, hookimpl, quant
from peft_kernel.plugins import manager, reset_manager
from peft_kernel.testing import perturb
from peft_kernel.testing.toy_quant import ToyBackend, ToyBackendPlugin, ToyInt8Linear
from peft_plugin_lora import LoraConfig


@pytest.fixture
def clean_manager():
    reset_manager()
    yield manager()
    reset_manager()


# -- state-dict key mapping ---------------------------------------------------------------


class RenamingPlugin:
    """Saves LoRA keys under a different name and maps them back on load."""

    @hookimpl
    def peft_kernel_adapter_state_dict(self, model, config, adapter_name, state_dict):
        for key in list(state_dict):
            state_dict[key.replace("lora_A", "down")] = state_dict.pop(key)

    @hookimpl
    def peft_kernel_load_state_dict(self, model, config, adapter_name, state_dict):
        self.seen = sorted(state_dict)


def test_state_dict_hooks_rename_on_save_and_invert_on_load(clean_manager, tmp_path):
    plugin = RenamingPlugin()
    clean_manager.register(plugin, name="renamer")
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"base_model.model.0.down.weight", "base_model.model.0.lora_B.weight"}
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), str(tmp_path))
    assert plugin.seen == sorted(keys)  # the load hook saw the checkpoint keys
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x))


# -- combinations ---------------------------------------------------------------------------


class MaxStrategy:
    @hookimpl
    def peft_kernel_register_combinations(self, register):
        register("elementwise_max", lambda tensors, weights, **kw: torch.stack(list(tensors)).amax(0))


def test_third_party_combination_is_registered(clean_manager):
    clean_manager.register(MaxStrategy(), name="max-strategy")
    combos = clean_manager.combinations()
    assert "elementwise_max" in combos and "ties" in combos and combos["dare_ties_svd"].svd
    out = combos["elementwise_max"].fn([torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])], [1, 1])
    torch.testing.assert_close(out, torch.tensor([3.0, 5.0]))


def test_duplicate_combination_name_reports_the_plugin(clean_manager):
    class Dup:
        @hookimpl
        def peft_kernel_register_combinations(self, register):
            register("ties", lambda tensors, weights, **kw: tensors[0])

    clean_manager.register(Dup(), name="dup-strategy")
    with pytest.warns(UserWarning, match="dup-strategy"):
        combos = clean_manager.combinations()
    assert combos["ties"].source == "peft_kernel.builtin"


# -- quantization backend: a toy int8 layer with a per-row scale ---------------------------------


def test_quant_backend_serves_lora_forward_and_merge(clean_manager):
    clean_manager.register(ToyBackendPlugin(), name="toy-backend")
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(16, 8))
    toy = ToyInt8Linear(float_model[0])
    model = nn.Sequential(toy)
    assert quant.find_backend(toy).name == "toy-int8"
    peft_model = get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    layer = peft_model.base_model.model[0]
    assert (layer.in_features, layer.out_features) == (16, 8)
    x = torch.randn(4, 16)
    unmerged = peft_model(x)
    reference = nn.functional.linear(x, toy.dequantize() + layer.delta_weight("default"), toy.bias)
    torch.testing.assert_close(unmerged, reference, atol=1e-5, rtol=0)
    peft_model.merge_adapter()
    error = (peft_model(x) - unmerged).abs().max().item()
    assert error < 0.05  # requantization error only
    record = {r.name: r for r in clean_manager.plugin_info()}["toy-backend"]
    assert record.backends == ["toy-int8"]


def test_forward_only_backend_refuses_merge_before_any_change(clean_manager):
    class ForwardOnly(ToyBackend):
        def merge_blocker(self, module):
            return "toy-int8 is forward only"

    class Plugin:
        @hookimpl
        def peft_kernel_register_quant_backends(self, register):
            register(ForwardOnly())

    clean_manager.register(Plugin(), name="fwd-only")
    torch.manual_seed(0)
    toy = ToyInt8Linear(nn.Linear(8, 8))
    peft_model = get_peft_model(nn.Sequential(toy), LoraConfig(target_modules=["0"], init_lora_weights=False))
    before = toy.qweight.clone()
    with pytest.raises(ValueError, match="forward only"):
        peft_model.merge_and_unload()
    assert torch.equal(toy.qweight, before)
    assert not peft_model.base_model.model[0].merged
