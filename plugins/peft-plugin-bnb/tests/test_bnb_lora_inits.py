"""LoRA's inits and optimizers (peft-plugin-lora) with bitsandbytes on CPU: our LoftQ
quantizers reproduce bitsandbytes' formats bit for bit, a LoftQ base loads into NF4 exactly,
replace_lora_weights_loftq works on 4- and 8-bit bases, EVA on a 4-bit base equals HF PEFT's,
and LoRA+ keeps embeddings in 32-bit state under an 8-bit optimizer.

HF PEFT's LoftQ cannot be the oracle here: it needs CUDA (see
tests/differential/test_lora_data_inits.py); bitsandbytes is, for the quantization."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from peft_kernel.testing import tiny_models

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
pytest.importorskip("peft_plugin_lora")

from safetensors.torch import save_file  # noqa: E402

from peft_kernel import PeftModel, PeftWarning, get_peft_model, quant  # noqa: E402
from peft_plugin_lora import LoftQConfig, LoraConfig, replace_lora_weights_loftq  # noqa: E402
from peft_plugin_lora.loftq import quantize_roundtrip  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny layers: intra-op threads only add contention (EVA's many small SVDs slow down ~10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 128), (30, 50)])  # whole blocks, and a partial last block
def test_4bit_roundtrip_equals_bitsandbytes(quant_type, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    assert torch.equal(quantize_roundtrip(weight, quant_type), F.dequantize_4bit(packed, state))


def test_int8_roundtrip_equals_bitsandbytes():
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    codes, scales, _ = F.int8_vectorwise_quant(weight)
    torch.testing.assert_close(quantize_roundtrip(weight, "int8"), F.int8_vectorwise_dequant(codes, scales),
                               rtol=1e-6, atol=1e-7)


MLP = functools.partial(tiny_models.MLP, (128, 64, 32))


def _base(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _quantized(model, kind):
    """``model`` with every nn.Linear replaced by a bitsandbytes layer holding its weights."""
    model = copy.deepcopy(model)
    for name in ("lin0", "lin1"):
        lin = getattr(model, name)
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0)
            q.load_state_dict(lin.state_dict())
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                                  compress_statistics=False, quant_type=kind)
            q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type=kind,
                                         compress_statistics=False, module=q)
            q.bias = nn.Parameter(lin.bias.detach().clone())
            # exact float32 compute: on AVX512-BF16 CPUs bitsandbytes would otherwise run inference in bf16
            q.support_avx512bf16_for_cpu = False
        setattr(model, name, q.to("cpu"))
    return model


X = torch.randn(8, 128, generator=torch.Generator().manual_seed(5))


def test_loftq_base_loads_into_nf4_exactly(tmp_path):
    """init_lora_weights='loftq' on the full-precision model, save the adapter, quantize the
    residual base with bitsandbytes, reload the adapter: the quantized layers hold exactly the
    LoftQ base, and the outputs are the full-precision LoftQ model's."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["lin0", "lin1"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    model = get_peft_model(_base(), config)
    model.save_pretrained(tmp_path)
    residual = copy.deepcopy(model).unload()
    quantized = _quantized(residual, "nf4")
    for name in ("lin0", "lin1"):
        assert torch.equal(quant.base_weight(getattr(quantized, name)), getattr(residual, name).weight)
    with pytest.warns(PeftWarning, match="loading a saved LoftQ adapter"):
        reloaded = PeftModel.from_pretrained(quantized, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X), model(X), rtol=1e-4, atol=1e-4)


def _save_original(model, directory):
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return str(directory)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_replace_lora_weights_loftq(kind, tmp_path):
    base = _base()
    path = _save_original(base, tmp_path / "base")
    model = get_peft_model(_quantized(base, kind), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        before = (model(X) - base(X)).abs().mean()
    assert replace_lora_weights_loftq(model, model_path=path) == ["lin0", "lin1"]
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        W = getattr(base, name).weight.detach()
        residual = W - quant.base_weight(layer.get_base_layer()).float()
        trailing = torch.linalg.svdvals(residual)[4:]
        error = torch.linalg.norm(residual - layer.delta_weight("default"))
        torch.testing.assert_close(error, trailing.square().sum().sqrt(), rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        after = (model(X) - base(X)).abs().mean()
    assert after < before, (after, before)


def test_replace_lora_weights_loftq_callback_can_reject(tmp_path):
    base = _base()
    path = _save_original(base, tmp_path / "base")
    model = get_peft_model(_quantized(base, "nf4"), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    kept = model.base_model.model.lin1.lora_A["default"].weight.detach().clone()
    seen = []

    def only_lin0(peft_model, name):
        seen.append(name)
        return name == "lin0"

    replace_lora_weights_loftq(model, model_path=path, callback=only_lin0)
    assert seen == ["lin0", "lin1"]
    assert torch.equal(model.base_model.model.lin1.lora_A["default"].weight, kept)
    assert model.base_model.model.lin0.lora_B["default"].weight.abs().sum() > 0


def test_replace_lora_weights_loftq_errors(tmp_path):
    base = _base()
    path = _save_original(base, tmp_path / "base")
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="No LoRA layer of adapter 'default' has a quantized base"):
        replace_lora_weights_loftq(plain, model_path=path)
    quantized = get_peft_model(_quantized(base, "nf4"), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        replace_lora_weights_loftq(quantized, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="pass model_path"):
        replace_lora_weights_loftq(quantized)


def test_loftq_init_on_a_quantized_model_points_to_replace():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(_quantized(_base(), "nf4"), LoraConfig(target_modules=["lin0"], init_lora_weights="loftq",
                                                              loftq_config=LoftQConfig()))
    assert any("replace_lora_weights_loftq" in str(w.message) for w in caught)


def test_eva_on_a_4bit_base_matches_hf():
    """EVA only reads layer inputs, so it works on quantized bases; same result as HF PEFT."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import EvaConfig as HfEvaConfig

    from peft_plugin_lora import EvaConfig, initialize_lora_eva_weights

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 128, generator=g) @ torch.randn(128, 128, generator=g) for _ in range(4)]
    options = {"forward_fn": lambda m, x: m(x), "prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None,
               "show_progress_bar": False}
    results = []
    for make_peft, config_cls, eva_cls, initialize in (
        (peft.get_peft_model, peft.LoraConfig, HfEvaConfig, peft.initialize_lora_eva_weights),
        (get_peft_model, LoraConfig, EvaConfig, initialize_lora_eva_weights),
    ):
        quantized = _quantized(_base(), "nf4")
        quantized.is_loaded_in_4bit = True  # HF PEFT picks its bnb layers only for flagged models
        torch.manual_seed(1)
        model = make_peft(quantized, config_cls(r=4, target_modules=["lin0", "lin1"], init_lora_weights="eva",
                                                eva_config=eva_cls(tau=0.8)))
        initialize(model, data, **options)
        results.append(model)
    hf, ours = results
    assert dict(ours.peft_config["default"].rank_pattern) == dict(hf.peft_config["default"].rank_pattern)
    for name in ("lin0", "lin1"):
        torch.testing.assert_close(getattr(ours.base_model.model, name).lora_A["default"].weight,
                                   getattr(hf.base_model.model, name).lora_A["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), hf(X))


def test_loraplus_keeps_embeddings_32bit_with_an_8bit_optimizer():
    model = nn.Sequential(nn.Embedding(16, 128), MLP())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0", "lin0"]))
    from peft_plugin_lora import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(peft_model, bnb.optim.Adam8bit, lr=1e-3, loraplus_lr_ratio=4)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 2, 1, 0]
    manager = bnb.optim.GlobalOptimManager.get_instance()
    embedding = peft_model.base_model.model[0].get_base_layer()
    assert manager.module_weight_config_triple and any(
        module is embedding and config == {"optim_bits": 32}
        for module, _, config in manager.module_weight_config_triple
    )
