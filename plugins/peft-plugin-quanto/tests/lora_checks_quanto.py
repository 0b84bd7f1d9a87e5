"""LoRA-on-a-quantized-base checks shared by the quantization backend plugins' tests.

Every backend plugin keeps a copy of this file in its ``tests/`` folder as
``lora_checks_<backend>.py`` (the plugins are separate distributions; the copies are
identical apart from the name, which keeps them apart when one pytest session collects
several plugins). A backend's test module supplies ``quantize(model)``
which swaps ``lin0`` and ``lin1`` of :class:`MLP` for quantized layers, and calls these
checks. Each check returns the errors it measured so the test can report them.

Needs the kernel (``peft_kernel``) and ``peft_plugin_lora``; the differential check needs
HF PEFT (``peft``) as the oracle.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

IN, HID, OUT = 128, 64, 8
TARGETS = ["lin0", "lin1"]


class MLP(nn.Module):
    """lin0 (128->64) and lin1 (64->128) get quantized; head stays a float nn.Linear."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(IN, HID)
        self.lin1 = nn.Linear(HID, IN)
        self.head = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def make_base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def inputs(n: int = 32, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _kernel():
    try:
        import peft_kernel
        import peft_plugin_lora
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"peft_kernel / peft_plugin_lora not importable: {exc}")
    return peft_kernel, peft_plugin_lora


def ours_lora(model, **kw):
    peft_kernel, peft_plugin_lora = _kernel()
    kw.setdefault("target_modules", TARGETS)
    kw.setdefault("r", 8)
    return peft_kernel.get_peft_model(model, peft_plugin_lora.LoraConfig(**kw))


def lora_layers(peft_model):
    root = peft_model.base_model.model
    return {name: getattr(root, name) for name in TARGETS}


def randomise_lora(peft_model, seed: int = 3, scale: float = 0.05):
    """Non-zero B so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


# -- checks ------------------------------------------------------------------------------


def check_wraps(quantize, backend_name: str, dtype=torch.float32) -> None:
    """get_peft_model wraps the quantized layers, leaves them the base layer, trains only
    LoRA, and (with B = 0) reproduces the quantized model exactly."""
    peft_kernel, _ = _kernel()
    from peft_kernel import quant

    qmodel = quantize(make_base())
    x = inputs(dtype=dtype)
    with torch.no_grad():
        expected = qmodel(x)
    quantized_types = {n: type(getattr(qmodel, n)) for n in TARGETS}
    pm = ours_lora(qmodel)
    for name, layer in lora_layers(pm).items():
        base = layer.get_base_layer()
        assert type(base) is quantized_types[name]
        backend = quant.find_backend(base)
        assert backend is not None and backend.name == backend_name
        assert (layer.in_features, layer.out_features) == backend.layer_shape(base)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        got = pm(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def check_training(quantize, steps: int = 15, dtype=torch.float32) -> tuple[float, float]:
    """A few Adam steps on a regression target lower the loss and leave the quantized
    base weights untouched."""
    from peft_kernel import quant

    pm = ours_lora(quantize(make_base()))
    pm.train()
    bases = {n: l.get_base_layer() for n, l in lora_layers(pm).items()}
    before = {n: quant.base_weight(b).detach().clone() for n, b in bases.items()}
    x = inputs(dtype=dtype)
    target = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = ((pm(x).float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, b in bases.items():
        assert torch.equal(quant.base_weight(b).detach(), before[n]), f"{n} base weight changed by training"
    return losses[0], losses[-1]


def check_merge(quantize, merged_tol: float, roundtrip_tol: float, dtype=torch.float32) -> dict:
    """merge / unmerge / merge_and_unload against the float32 "ideal" merge.

    * ``unmerged_vs_fp32``: adapter forward vs a float model holding the dequantized base
      weight plus the LoRA delta (tests the forward path; ~0 for weight-only backends);
    * ``merged_vs_fp32``: merged quantized model vs the same float model (the
      requantization error of the merge), bounded by ``merged_tol``;
    * ``unmerge_roundtrip``: output after merge + unmerge vs before (two requantizations),
      bounded by ``roundtrip_tol``.
    """
    from peft_kernel import quant

    qmodel = quantize(make_base())
    pm = ours_lora(qmodel)
    randomise_lora(pm)
    pm.eval()
    x = inputs(dtype=dtype)

    ref = make_base()  # float model: dequantized base + delta, bias and head as the layers hold them
    for name, layer in lora_layers(pm).items():
        base = layer.get_base_layer()
        lin = getattr(ref, name)
        with torch.no_grad():
            lin.weight.copy_(quant.base_weight(base).detach().float() + layer.delta_weight("default").float())
            lin.bias.copy_(base.bias.detach().float())
    ref.head.load_state_dict({k: v.float() for k, v in qmodel.head.state_dict().items()})

    with torch.no_grad():
        y_ref = ref(x.float())
        y_unmerged = pm(x)
        pm.merge_adapter()
        y_merged = pm(x)
        for layer in lora_layers(pm).values():
            assert layer.merged
        pm.unmerge_adapter()
        y_roundtrip = pm(x)
    errors = {
        "unmerged_vs_fp32": rel(y_unmerged, y_ref),
        "merged_vs_fp32": rel(y_merged, y_ref),
        "merged_vs_unmerged": rel(y_merged, y_unmerged),
        "unmerge_roundtrip": rel(y_roundtrip, y_unmerged),
    }
    assert errors["merged_vs_fp32"] < merged_tol, errors
    assert errors["unmerge_roundtrip"] < roundtrip_tol, errors

    # merge_and_unload on a fresh, identical model hands back the quantized layers with the
    # adapter folded in, computing what merge_adapter computed
    pm2 = ours_lora(quantize(make_base()))
    randomise_lora(pm2)
    types = {n: type(l.get_base_layer()) for n, l in lora_layers(pm2).items()}
    with torch.no_grad():
        unloaded = pm2.merge_and_unload()
        for name in TARGETS:
            layer = getattr(unloaded, name)
            assert type(layer) is types[name] and quant.find_backend(layer) is not None
        unloaded.eval()
        errors["merge_and_unload_vs_merge"] = rel(unloaded(x), y_merged)
    assert errors["merge_and_unload_vs_merge"] < 1e-5, errors
    return errors


def check_merge_blocked(quantize, reason_fragment: str, dtype=torch.float32) -> str:
    """Forward-only base: merging raises a clear ValueError before anything changes."""
    pm = ours_lora(quantize(make_base()))
    randomise_lora(pm)
    pm.eval()
    x = inputs(dtype=dtype)
    with torch.no_grad():
        before = pm(x)
    with pytest.raises(ValueError) as info:
        pm.merge_adapter()
    message = str(info.value)
    assert reason_fragment in message, message
    with pytest.raises(ValueError):
        pm.merge_and_unload()
    for layer in lora_layers(pm).values():
        assert not layer.merged
    with torch.no_grad():
        assert torch.equal(pm(x), before)
    return message


def check_against_hf(
    quantize, merge: bool, merged_tol: float = 0.0, dtype=torch.float32, hf_prepare=None,
    merged_compare: str = "output", **lora_kw
) -> dict:
    """Same quantized base, same LoRA config and weights: our output equals HF PEFT's.
    With ``merge`` the merged models are compared too (both requantize): their outputs, or
    with ``merged_compare="weight"`` the dequantized merged base weights (for backends
    where HF PEFT's merge loses something else, see the caller).

    ``hf_prepare(model)`` adjusts the HF side's base model first where HF PEFT needs more
    than the layer itself to pick its quantized wrapper (e.g. ``is_loaded_in_4bit``)."""
    hf_peft = pytest.importorskip("peft")
    lora_kw.setdefault("target_modules", TARGETS)
    lora_kw.setdefault("r", 8)
    ours = ours_lora(quantize(make_base()), **lora_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_base = quantize(make_base())
        if hf_prepare is not None:
            hf_prepare(hf_base)
        hf = hf_peft.get_peft_model(hf_base, hf_peft.LoraConfig(**lora_kw))
    randomise_lora(ours)
    hf_params = dict(hf.named_parameters())
    ours_lora_params = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert set(ours_lora_params) == {n for n in hf_params if "lora_" in n}
    with torch.no_grad():
        for n, p in ours_lora_params.items():
            hf_params[n].copy_(p)
    ours.eval()
    hf.eval()
    x = inputs(dtype=dtype)
    with torch.no_grad():
        y_ours, y_hf = ours(x), hf(x)
    errors = {"forward_max_abs": (y_ours.float() - y_hf.float()).abs().max().item()}
    assert torch.allclose(y_ours.float(), y_hf.float(), atol=1e-5, rtol=1e-5), errors
    if merge:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours.merge_adapter()
            hf.merge_adapter()
            y_ours_m, y_hf_m = ours(x), hf(x)
        if merged_compare == "weight":
            from peft_kernel import quant

            hf_root = hf.base_model.model
            errors["merged_weight_rel"] = max(
                rel(quant.base_weight(layer.get_base_layer()), quant.base_weight(getattr(hf_root, name).get_base_layer()))
                for name, layer in lora_layers(ours).items()
            )
            assert errors["merged_weight_rel"] <= merged_tol, errors
        else:
            errors["merged_rel"] = rel(y_ours_m, y_hf_m)
            errors["merged_max_abs"] = (y_ours_m.float() - y_hf_m.float()).abs().max().item()
            assert errors["merged_rel"] <= merged_tol, errors
    return errors

