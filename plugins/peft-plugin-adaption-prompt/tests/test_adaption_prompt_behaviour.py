"""Adaption prompt on its own terms: exact identity at init for every attention layout,
which modules are adapted, clear errors, gradients (gradcheck, gradient checkpointing),
half-precision bases, task heads and injection without a PeftModel."""

from __future__ import annotations

import copy

import _ap_models as AP
import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import MergeNotSupportedError, PeftModel, get_peft_model
from peft_kernel.testing import perturb
from peft_kernel.testing import tiny_models as M
from peft_plugin_adaption_prompt import AdaptedAttention, AdaptionPromptConfig, FusedQKVAttention, RotaryAttention

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


def config(**kwargs) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(**{"task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 2, **kwargs})


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=M.ids(), **kwargs).logits


def adapted_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, AdaptedAttention)]


# -- what is adapted ---------------------------------------------------------------------


@pytest.mark.parametrize("model", list(AP.MODELS))
def test_new_adapter_is_an_exact_identity(model):
    """Gate 0 at init: outputs are bit-identical to the base model's (with attention biases
    too: o_proj's bias is not added a second time)."""
    base = AP.MODELS[model]()
    expected = logits(copy.deepcopy(base))
    adapted = get_peft_model(base, config())
    layer_cls = FusedQKVAttention if model == "gpt2" else RotaryAttention
    assert len(adapted_names(adapted)) == 2 and all(isinstance(m, layer_cls) for m in adapted.modules()
                                                    if isinstance(m, AdaptedAttention))
    assert torch.equal(logits(adapted), expected)
    perturb(adapted)
    assert not torch.allclose(logits(adapted), expected, atol=1e-4)


def test_the_last_adapter_layers_attention_modules_are_adapted():
    model = get_peft_model(M.llama(num_hidden_layers=3), config(adapter_layers=2))
    assert adapted_names(model) == ["base_model.model.model.layers.1.self_attn",
                                    "base_model.model.model.layers.2.self_attn"]
    assert model.peft_config["default"].target_modules == "self_attn"  # the model type's default, saved as HF does
    layer = model.base_model.model.model.layers[2].self_attn
    assert layer.adaption_prompt["default"].shape == (1, 4, 32) and layer.adaption_gate["default"].shape == (1,)
    assert torch.equal(layer.adaption_gate["default"], torch.zeros(1))
    assert model.get_nb_trainable_parameters()[0] == 2 * (4 * 32 + 1)


def test_adapters_with_different_depths():
    model = get_peft_model(M.llama(), config(adapter_layers=2))
    model.add_adapter("top", config(adapter_layers=1, adapter_len=2))
    layers = model.base_model.model.model.layers
    assert set(layers[0].self_attn.adaption_prompt) == {"default"}
    assert set(layers[1].self_attn.adaption_prompt) == {"default", "top"}
    model.set_adapter("top")
    perturb(model, seed=3)  # moves only the active adapter's tensors
    with model.disable_adapter():
        base = logits(model)
    assert not torch.equal(logits(model), base)
    assert torch.equal(layers[0].self_attn.adaption_gate["default"], torch.zeros(1)), "an inactive adapter trained"


def test_too_many_adapter_layers_is_refused_and_leaves_the_model_alone():
    base = M.llama()
    with pytest.raises(ValueError, match=r"adapter_layers=3, but the model has 2 modules named 'self_attn'"):
        get_peft_model(base, config(adapter_layers=3))
    assert not adapted_names(base)


def test_targets_without_a_model_type_default():
    class Wrapped(nn.Module):  # no transformers config: no default attention name
        def __init__(self):
            super().__init__()
            self.inner = M.llama()

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    with pytest.raises(ValueError, match="No default attention modules for model type 'custom'.*target_modules="):
        get_peft_model(Wrapped(), config())
    model = get_peft_model(Wrapped(), config(task_type=None, target_modules="self_attn", adapter_layers=1))
    assert adapted_names(model) == ["base_model.model.inner.model.layers.1.self_attn"]


def test_attention_it_cannot_reproduce_is_refused():
    """Qwen3 normalises queries and keys per head; the prompt keys would need it too."""
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn' of type .*Qwen3Attention is not supported by "
                                         r"ADAPTION_PROMPT.*rotary position_embeddings"):
        get_peft_model(M.decoder("Qwen3", head_dim=8), config(target_modules="self_attn", adapter_layers=1))
    with pytest.raises(ValueError, match="'model.layers.1.mlp' of type .*LlamaMLP is not supported"):
        get_peft_model(M.llama(), config(target_modules="mlp", adapter_layers=1))


@pytest.mark.parametrize("fields, message", [
    (dict(adapter_len=0), "adapter_len must be a positive integer, got 0"),
    (dict(adapter_layers=None), "adapter_layers must be a positive integer, got None"),
    (dict(adapter_len=True), "adapter_len must be"),  # the kernel's field type check: a bool is no number
    (dict(target_modules=["self_attn", "attn"]), "one attribute name"),
])
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)


def test_config_fields_and_a_one_name_list():
    assert config(target_modules=["self_attn"]).target_modules == "self_attn"  # as the CLI's --target-modules gives
    saved = config(target_modules="self_attn").to_dict()
    assert set(saved) - {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                         "revision", "inference_mode"} == {"target_modules", "adapter_len", "adapter_layers"}
    assert config().is_adaption_prompt and not config().is_prompt_learning
    with pytest.raises(TypeError):
        AdaptionPromptConfig(adapter_len=4, adapter_layers=1, modules_to_save=["lm_head"])  # not an HF field


# -- what is refused at run time ------------------------------------------------------------


def test_merge_is_refused_before_anything_changes():
    model = get_peft_model(M.llama(), config())
    perturb(model)
    before = logits(model)
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeNotSupportedError, match="no change of the base weights can express"):
            merge()
    assert torch.equal(logits(model), before)
    assert torch.equal(logits(model.unload()), logits(M.llama()))


def test_mixed_adapter_batches_are_refused():
    model = get_peft_model(M.llama(), config()).eval()
    with pytest.raises(TypeError, match="do not support mixed adapter batches"):
        logits(model, adapter_names=["default", "__base__"])


class ToyAttention(nn.Module):
    """Not transformers: the projections of a Llama attention, but no rotary tables needed."""

    def __init__(self):
        super().__init__()
        self.head_dim = 8
        self.q_proj, self.o_proj = nn.Linear(32, 32), nn.Linear(32, 32)
        self.k_proj, self.v_proj = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, hidden_states, position_embeddings=None):
        return self.o_proj(torch.tanh(self.q_proj(hidden_states)))


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ToyAttention()

    def forward(self, x):
        return self.attn(hidden_states=x)


def test_missing_rotary_tables_are_named():
    model = get_peft_model(nn.Sequential(ToyBlock()), config(task_type=None, target_modules="attn", adapter_layers=1))
    model.base_model.model[0].attn.adaption_gate["default"].data.fill_(1.0)
    with pytest.raises(ValueError, match="without position_embeddings=.*rotary tables"):
        model(torch.randn(1, 3, 32))


# -- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_gradcheck(model):
    """Analytic gradients of the prompt, the gate and the hidden states match finite differences."""
    base = AP.MODELS[model]().double()
    adapted = get_peft_model(base, config(adapter_len=2, adapter_layers=1))
    layer = next(m for m in adapted.modules() if isinstance(m, AdaptedAttention))
    x = torch.randn(1, 3, 32, dtype=torch.double, generator=torch.Generator().manual_seed(0), requires_grad=True)
    kwargs = {"attention_mask": None}
    if model == "llama":
        kwargs["position_embeddings"] = base.model.rotary_emb(x, torch.arange(3)[None])
    prompt = layer.adaption_prompt["default"].detach().clone().requires_grad_()
    gate = torch.tensor([0.7], dtype=torch.double, requires_grad=True)

    def attention(prompt, gate, x):
        params = {"adaption_prompt.default": prompt, "adaption_gate.default": gate}
        return torch.func.functional_call(layer, params, (), {"hidden_states": x, **kwargs})[0]

    assert torch.autograd.gradcheck(attention, (prompt, gate, x))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = get_peft_model(M.llama(), config())
        perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.get_base_model().is_gradient_checkpointing
        model.train()
        model(input_ids=M.ids(), labels=M.ids()).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and len(plain) == 4
    for name, grad in plain.items():
        assert checkpointed[name] is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-7)


# -- dtypes, task heads, injection ----------------------------------------------------------


def test_half_precision_base_keeps_float32_adapters():
    model = get_peft_model(M.llama().to(torch.bfloat16), config())
    tensors = [p for n, p in model.named_parameters() if ".adaption_" in n]
    assert tensors and all(p.dtype == torch.float32 for p in tensors)
    perturb(model)
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    kept = get_peft_model(M.llama().to(torch.bfloat16), config(), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for n, p in kept.named_parameters() if ".adaption_" in n)


def test_sequence_classification_head_is_trained_saved_and_loaded(tmp_path):
    model = get_peft_model(M.decoder("Llama", "ForSequenceClassification", num_labels=3), config(task_type="SEQ_CLS"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score.modules_to_save.default." in n for n in trainable)
    perturb(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(M.decoder("Llama", "ForSequenceClassification", num_labels=3), tmp_path)
    assert torch.equal(logits(loaded), expected)


def test_inject_adapter_in_model_and_state_dict_targets():
    """Unlike HF PEFT, injection without a PeftModel works: it is an ordinary layer method."""
    model = peft_kernel.inject_adapter_in_model(config(adapter_layers=1), M.llama())
    assert adapted_names(model) == ["model.layers.1.self_attn"]
    state = {"base_model.model.model.layers.0.self_attn.adaption_prompt": torch.zeros(1, 4, 32)}
    model = peft_kernel.inject_adapter_in_model(config(), M.llama(), state_dict=state)
    assert adapted_names(model) == ["model.layers.0.self_attn"]
