"""BOFT beyond the oracle: registration, bad input, the butterfly permutations, and layers HF
PEFT's BOFT does not adapt. (Its ``peft-kernel finetune`` run is in tests/cli/test_cli_finetune.py.)"""

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_boft import BOFTConfig, BOFTLayer, BOFTModel


def test_registered_through_the_entry_point():
    spec = manager().method("BOFT")
    assert spec.config_cls is BOFTConfig and spec.model_cls is BOFTModel and spec.prefix == "boft_"
    assert not spec.is_mixed_compatible and spec.source == "boft"  # as in HF PEFT


@pytest.mark.parametrize("kwargs,message", [
    ({"boft_block_size": 4, "boft_block_num": 2}, "exactly one of `boft_block_size`"),
    ({"boft_block_size": 0}, "exactly one of `boft_block_size`"),
    ({"boft_n_butterfly_factor": 0}, "positive integer"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"boft_block_size": 3}, "boft_block_size=3 does not divide the layer's input size 8"),
    ({"boft_block_size": 0, "boft_block_num": 3}, "boft_block_num=3 does not divide"),
    ({"boft_block_size": 2, "boft_n_butterfly_factor": 4}, "multiple of 8; this layer .* has 4 blocks of 2"),
])
def test_layouts_that_do_not_fit_the_layer_are_refused_and_change_nothing(kwargs, message):
    model = M.build("mlp8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        peft_kernel.get_peft_model(model, BOFTConfig(target_modules=["lin0"], **kwargs))
    assert type(model.lin0) is nn.Linear and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_butterfly_is_the_product_of_permuted_block_diagonal_factors():
    """M = B₂B₁B₀ with Bᵢ = Pᵢ·blockdiag(Qᵢ)·Pᵢᵀ; factor i mixes entries b·2ⁱ⁻¹ apart."""
    torch.manual_seed(0)
    layer = BOFTLayer(nn.Linear(8, 2), "default", config=BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3,
                                                                    init_weights=False))
    rotations = layer.boft_R["default"].detach()
    blocks = peft_kernel.orthogonal.cayley((rotations - rotations.mT) / 2)
    permutations = [list(range(8)), [0, 2, 1, 3, 4, 6, 5, 7], [0, 2, 4, 6, 1, 3, 5, 7]]  # Pᵢ[j, pᵢ[j]] = 1
    factors = [torch.eye(8)[p] @ torch.block_diag(*f) @ torch.eye(8)[p].T for p, f in zip(permutations, blocks,
                                                                                          strict=True)]
    butterfly = factors[2] @ factors[1] @ factors[0]
    eye = torch.eye(8)
    torch.testing.assert_close(layer.butterfly(eye, "default").detach(), butterfly, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.butterfly(eye, "default", transpose=True).detach(), butterfly.T, atol=1e-6, rtol=0)
    assert (butterfly.abs() > 1e-6).all()  # three factors reach every input from every output


def test_transformers_conv1d_layers():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.gpt2(), BOFTConfig(target_modules=["c_attn", "c_fc"],
                                                                 boft_block_size=4, boft_n_butterfly_factor=2))
    assert model.base_model.model.transformer.h[0].attn.c_attn.boft_s["default"].shape == (96, 1)
    D.perturb(model, scale=0.1)
    D.assert_merge_keeps_outputs(model, M.inputs("gpt2"))
