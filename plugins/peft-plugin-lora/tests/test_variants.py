"""What the variants table (``variants/``) gives every variant: HF PEFT checkpoints load with
``low_cpu_mem_usage``, several variants share a layer (as in HF PEFT), deleting an adapter
drops its variant state, and one adapter takes one variant."""

from __future__ import annotations

import _lora_models as M
import pytest
import torch

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.testing.differential import assert_close, perturb, run
from peft_plugin_lora import BdLoraConfig, KasaConfig, LoraConfig, MontecloraConfig, VeloraConfig

hf_peft = pytest.importorskip("peft")

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
VARIANTS = {
    "kasa_config": KasaConfig(),
    "use_bdlora": BdLoraConfig(target_modules_bd_a=["o"], target_modules_bd_b=["q"], nblocks=2),
    "velora_config": VeloraConfig(num_groups=4),
    "monteclora_config": MontecloraConfig(num_samples=2, buffer_size=1),
}
net = M.qo


@pytest.mark.parametrize("field", list(VARIANTS))
def test_hf_checkpoint_loads_with_low_cpu_mem_usage(field, tmp_path):
    hf, _ = M.variant_pair(field, VARIANTS[field])
    perturb(hf)
    hf.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(net(), str(tmp_path), low_cpu_mem_usage=True).eval()
    assert not any(t.device.type == "meta" for t in loaded.state_dict().values())
    assert_close(run(loaded, X), run(hf, X), "low_cpu_mem_usage load")


def test_variants_share_a_layer_and_delete_cleanly():
    names = {"velora_config": "default", "use_bdlora": "bd", "monteclora_config": "mc"}
    hf, ours = M.variant_pair("velora_config", VARIANTS["velora_config"])
    for field in ("use_bdlora", "monteclora_config"):
        other_hf, other = M.variant_pair(field, VARIANTS[field])
        hf.add_adapter(names[field], other_hf.peft_config["default"])
        ours.add_adapter(names[field], other.peft_config["default"])
    for model in (hf, ours):
        model.base_model.set_adapter(list(names.values()))
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    hf.eval(), ours.eval()
    assert_close(run(ours, X), run(hf, X), "three variants active")
    unmerged = run(ours, X)
    ours.merge_adapter()
    assert_close(run(ours, X), unmerged, "merged vs unmerged", atol=1e-4)
    ours.unmerge_adapter()
    ours.delete_adapter("mc")
    layer = ours.base_model.model.q
    assert "mc" not in layer.lora_monteclora_sampler and "mc" not in layer.variant
    assert not any(".mc" in key for key in ours.state_dict())


def test_one_variant_per_adapter():
    with pytest.raises(ValueError, match="cannot be combined"):
        LoraConfig(velora_config=VeloraConfig(), monteclora_config=MontecloraConfig())
    with pytest.raises(ValueError, match="cannot be combined"):
        LoraConfig(use_bdlora=BdLoraConfig(), alora_invocation_tokens=[1], task_type="CAUSAL_LM")


def test_megatron_config_stays_refused_and_names_megatron_core():
    with pytest.raises(NotImplementedError, match="megatron-core"):
        LoraConfig(megatron_config={"tensor_model_parallel_size": 2})


def test_qalora_outside_gptq_is_plain_lora_as_in_hf(tmp_path):
    # HF PEFT applies QA-LoRA in its GPTQ layers only; other layers of such an adapter get plain LoRA
    config = dict(r=4, target_modules=["q", "o"], use_qalora=True, qalora_group_size=4)
    torch.manual_seed(1)
    hf = hf_peft.get_peft_model(net(), hf_peft.LoraConfig(**config)).eval()
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="GPTQ layers only"):
        ours = get_peft_model(net(), LoraConfig(**config)).eval()
    assert ours.base_model.model.q.lora_A["default"].weight.shape == (4, 16)
    perturb(hf)
    ours.load_state_dict(hf.state_dict())
    assert_close(run(ours, X), run(hf, X), "plain LoRA")
    with pytest.raises(ValueError, match="qalora_group_size"):
        LoraConfig(use_qalora=True, qalora_group_size=0)


def test_hotswap_keeps_the_variant_and_refuses_other_ranks(tmp_path):
    from peft_plugin_lora import hotswap_adapter

    def saved(seed: int, r: int, name: str, **variant):
        torch.manual_seed(seed)
        model = get_peft_model(net(), LoraConfig(r=r, target_modules=["q", "o"], **variant))
        perturb(model, seed=seed)
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    kasa = {"kasa_config": KasaConfig()}
    first, second = saved(1, 4, "kasa1", **kasa), saved(2, 4, "kasa2", **kasa)
    model = PeftModel.from_pretrained(net(), str(first)).eval()
    hotswap_adapter(model, str(second), adapter_name="default")
    assert_close(run(model, X), run(PeftModel.from_pretrained(net(), str(second)).eval(), X), "hot-swapped KaSA")
    with pytest.raises(ValueError, match="kasa_config"):
        hotswap_adapter(model, str(saved(3, 4, "plain")), adapter_name="default")
    bd = {"use_bdlora": VARIANTS["use_bdlora"]}
    model = PeftModel.from_pretrained(net(), str(saved(1, 4, "bd4", **bd)))
    before = run(model, X)
    with pytest.raises(ValueError, match="BD-LoRA adapters hot-swap only at equal ranks"):
        hotswap_adapter(model, str(saved(2, 2, "bd2", **bd)), adapter_name="default")
    assert torch.equal(run(model, X), before)
