"""LoRA layers. The math, per adapter:

    h = W₀x + s · B A dropout(x)        s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

``A`` (r × in) and ``B`` (out × r) are the trainable factors; everything else (several
adapters, merge state, devices, quantized bases, mixed batches) is the kernel's job.
DoRA rescales the adapted weight per output channel: W' = m · (W₀ + sBA) / ‖W₀ + sBA‖.

Variants on linear layers: aLoRA (``alora.py``) adds sBA x only to the tokens from the
invocation sequence on; an Arrow router (``arrow.py``) adds a per-token mixture of the
layer's other LoRAs. ``ParamWrapper`` puts W + sBA in place of a bare parameter (per expert
for a 3-D one). A scaling may be a 0-d tensor (``prepare_model_for_compiled_hotswap``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_dynamo_compiling

from peft_kernel import AdapterLayer, PeftWarning, quant
from peft_kernel.layer import ParameterLayer, bare_module, empty_module, plain_call

from . import alora, arrow, batched, variants
from .config import init_name


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear around ``weight`` (out × in) and ``bias``, skipping its random init
    (which costs more than the rest of building a LoRA layer)."""
    layer = bare_module(nn.Linear)
    layer.__dict__.update(in_features=weight.shape[1], out_features=weight.shape[0])
    layer._parameters.update(weight=nn.Parameter(weight), bias=None if bias is None else nn.Parameter(bias))
    return layer


def _kaiming_uniform_(tensor: torch.Tensor, a: float = math.sqrt(5)) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(tensor, a)`` (fan_in, leaky_relu): the same bound and
    the same single ``uniform_`` draw, without the per-call dispatch overhead."""
    fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
    gain = math.sqrt(2.0 / (1 + a**2))
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return tensor.uniform_(-bound, bound)


def _linear_factors(in_features: int, out_features: int, r: int, lora_bias: bool) -> tuple[nn.Linear, nn.Linear]:
    """``lora_A`` (in -> r) and ``lora_B`` (r -> out) with the draws nn.Linear's constructor
    makes, in its order, so that a seed gives the same factors as in HF PEFT (B is zeroed by
    ``initialise()`` afterwards)."""
    A = _linear(torch.empty(r, in_features))
    B = _linear(torch.empty(out_features, r), torch.empty(out_features) if lora_bias else None)
    if A.weight.device.type != "meta":
        with torch.no_grad():
            _kaiming_uniform_(A.weight)
            _kaiming_uniform_(B.weight)
            if lora_bias:
                B.bias.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
    return A, B


def factors_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float):
    """``(A, B) = (√(S/s)·Vh, U·√(S/s))``, so that ``s · B @ A = U diag(S) Vh``: the
    factors of the SVD-based inits (PiSSA, CorDA, LoftQ)."""
    if scaling <= 0:
        raise ValueError(f"an SVD-based init needs a positive LoRA scaling (lora_alpha / r), got {scaling}")
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers a module holds itself (not its submodules')."""
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _dora_shift(bias, lora_bias, scaling, scale):
    """The additive term of a DoRA output, b + s·scale·b_B (``None`` without either bias)."""
    if lora_bias is None:
        return bias
    shift = lora_bias * (scaling * scale)
    return shift if bias is None else bias + shift


class Magnitude(nn.Module):
    """DoRA's per-output-channel magnitude (a module so FSDP can wrap it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=True)


class LoraLayer(AdapterLayer):
    """Bookkeeping shared by every LoRA layer. Subclasses implement ``make_factors``,
    ``adapter_forward`` and ``delta_weight``; custom layers (``register_layer_mapping``)
    subclass this too."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora", "use_dora", "lora_bias", "alora",
                         "arrow_config", "variant")
    #: whether this layer type supports the aLoRA and Arrow variants, and those of ``variants.VARIANTS``
    supports_routing_variants = False
    supports_variants = False

    def __init__(self, base_layer: nn.Module, ephemeral_gpu_offload: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.register_containers("lora_dropout", "lora_A", "lora_B")
        self.register_containers("lora_embedding_A", "lora_embedding_B", container=nn.ParameterDict)
        self.register_containers("lora_magnitude_vector")
        # per adapter: rank, alpha, scaling, DoRA / lora_bias flags, DoRA norms while merged
        # aLoRA / Arrow: per adapter, whether it is an aLoRA; a router's ArrowConfig and routing state
        self.set_plain_attributes(r={}, lora_alpha={}, scaling={}, use_rslora={}, use_dora={}, lora_bias={},
                                  _dora_norm={}, fan_in_fan_out=False, alora={}, arrow_config={}, arrow_state={},
                                  variant={})

    # -- creation ---------------------------------------------------------------------

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config=None, **kwargs: Any) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        lora_dropout = getattr(config, "lora_dropout", kwargs.get("lora_dropout", 0.0))
        use_rslora = getattr(config, "use_rslora", kwargs.get("use_rslora", False))
        use_dora = getattr(config, "use_dora", kwargs.get("use_dora", False))
        lora_bias = getattr(config, "lora_bias", kwargs.get("lora_bias", False))
        init = init_name(getattr(config, "init_lora_weights", kwargs.get("init_lora_weights", True)))
        routed = {"alora_invocation_tokens": getattr(config, "alora_invocation_tokens", None),
                  "arrow_config": getattr(config, "arrow_config", None)}
        used = [name for name, value in routed.items() if value is not None]
        if use_dora and isinstance(self.base_layer, AdapterLayer):  # a mixed model, other methods inside
            raise ValueError(
                "DoRA (use_dora=True) scales by the norm of the base weight alone, so it cannot act through the "
                f"{type(self.base_layer).__name__} inside this layer; add the DoRA adapter before adapters of other "
                "methods (its layer then sits inside theirs)"
            )
        if used and not self.supports_routing_variants:
            raise ValueError(f"{used[0]} is supported on linear layers only, not on "
                             f"{type(self.get_base_layer()).__name__}; leave those layers out of target_modules")
        variant = variants.resolve(config)
        if variant is not None and not variant.applies(self):
            variant = None
        if variant is not None and not self.supports_variants:
            raise ValueError(f"{variant.title} ({variant.field}) is supported on linear layers only, not on "
                             f"{type(self.get_base_layer()).__name__}; leave those layers out of target_modules")
        self.variant.pop(adapter_name, None)
        self.alora[adapter_name] = routed["alora_invocation_tokens"] is not None
        if routed["arrow_config"] is not None:
            self.arrow_config[adapter_name] = routed["arrow_config"]
            self.arrow_state.pop(adapter_name, None)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = (
            nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else empty_module(nn.Identity)
        )
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = self.initial_scaling(adapter_name)
        if lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(f"lora_bias=True on a {type(self.get_base_layer()).__name__} without a bias: the adapter "
                          "works, but it cannot be merged into this layer.", PeftWarning, stacklevel=3)
        self.lora_bias[adapter_name] = lora_bias
        self.make_factors(adapter_name, r, lora_bias)
        if not self._is_meta(adapter_name):
            if init == "loftq":  # inits that need settings beyond their name
                self._init_loftq(adapter_name, getattr(config, "loftq_config", kwargs.get("loftq_config")) or {})
            elif init == "lora_ga":
                self._init_lora_ga(adapter_name, getattr(config, "lora_ga_config", kwargs.get("lora_ga_config")))
            else:
                self.initialise(adapter_name, init)
        if variant is not None:
            variants.add_containers(self, variant)
            variant.init(self, adapter_name, config, **kwargs)
            self.variant[adapter_name] = variant
        self.use_dora[adapter_name] = use_dora
        if use_dora:
            self.create_magnitude(adapter_name)
        self.adapter_state_changed()

    def _is_meta(self, adapter_name: str) -> bool:
        for attr in ("lora_A", "lora_embedding_A"):
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                tensor = item.weight if isinstance(item, nn.Module) else item
                return tensor.device.type == "meta"
        return False

    def initialise(self, adapter_name: str, init) -> None:
        """Initialise the factors (``init_lora_weights``; ``"loftq"`` goes through
        ``update_layer``, which has its settings)."""
        if init is False:
            return
        if isinstance(init, str) and init.startswith("pissa"):
            return self._init_pissa(adapter_name, init)
        if init == "olora":
            return self._init_olora(adapter_name)
        if init == "orthogonal":
            return self._init_orthogonal(adapter_name)
        if init == "corda":
            return self._init_corda(adapter_name)
        if init == "lora_ga":  # without its settings (a combined or re-created adapter): nothing to follow
            init = True
        if init == "eva":
            # A keeps its construction draw until initialize_lora_eva_weights() overwrites it
            self._require_linear(init)
            with torch.no_grad():
                self.lora_B[adapter_name].weight.zero_()
            return
        if adapter_name in self.lora_A:
            A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            with torch.no_grad():
                if init == "gaussian":
                    nn.init.normal_(A, std=1 / self.r[adapter_name])
                else:
                    _kaiming_uniform_(A)
                B.zero_()
                if self.lora_bias[adapter_name]:
                    nn.init.zeros_(self.lora_B[adapter_name].bias)
        elif adapter_name in self.lora_embedding_A:
            with torch.no_grad():
                nn.init.zeros_(self.lora_embedding_A[adapter_name])
                nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _base_matrix(self) -> torch.Tensor:
        """Base weight as an (out, in) float32 matrix."""
        weight = quant.base_weight(self.get_base_layer()).detach().float()
        return weight.T if self.fan_in_fan_out else weight.reshape(weight.shape[0], -1)

    def _write_base_matrix(self, matrix: torch.Tensor) -> None:
        base = self.get_base_layer()
        current = quant.base_weight(base)
        matrix = matrix.T if self.fan_in_fan_out else matrix.reshape(current.shape)
        quant.set_base_weight(base, matrix.to(current.dtype))

    def _init_pissa(self, adapter_name: str, init: str) -> None:
        """Principal singular components as the adapter; the residual stays in the base."""
        if adapter_name not in self.lora_A:
            raise ValueError(f"init_lora_weights={init!r} is only supported for linear layers")
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        weight = self._base_matrix()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            niter = int(init.split("_niter_")[-1])
            U, S, V = torch.svd_lowrank(weight, r, niter=niter)
            Vh = V.T
        A, B = factors_from_svd(U, S, Vh, s)
        self._set_factors(adapter_name, A, B)
        self._write_base_matrix(weight - s * B @ A)

    def _require_linear(self, init) -> None:
        if not isinstance(self, Linear):
            raise ValueError(
                f"init_lora_weights={init!r} supports linear layers only, not {type(self.get_base_layer()).__name__}; "
                "leave such layers out of target_modules (or adapt them with a second, plainly initialised adapter)."
            )

    def _init_loftq(self, adapter_name: str, settings: dict) -> None:
        """LoftQ: the base becomes its own quantize-dequantize round trip Q, the adapter the
        best rank-r fit of what quantization lost (alternated ``loftq_iter`` times)."""
        from .loftq import loftq_factors, quant_type_for_bits, quantize_roundtrip

        self._require_linear("loftq")
        if quant.is_quantized(self.get_base_layer()):
            # typically a saved LoftQ adapter loaded onto the quantized LoftQ base: its factors are loaded next
            warnings.warn(
                f"init_lora_weights='loftq' needs the full-precision weight, but {type(self.get_base_layer()).__name__}"
                " is quantized: this adapter starts as init_lora_weights=True. That is right when loading a saved "
                "LoftQ adapter; to LoftQ-initialise a quantized model call replace_lora_weights_loftq().",
                PeftWarning, stacklevel=5,
            )
            return self.initialise(adapter_name, True)
        quant_type = quant_type_for_bits(settings.get("loftq_bits", 4))
        if self.fan_in_fan_out:  # quantize in the layout the weight is stored (and later loaded) in
            def quantize(m):
                return quantize_roundtrip(m.T, quant_type).T
        else:
            def quantize(m):
                return quantize_roundtrip(m, quant_type)
        quantized, A, B = loftq_factors(self._base_matrix(), quantize, self.r[adapter_name],
                                        self.scaling[adapter_name], settings.get("loftq_iter", 1))
        self._set_factors(adapter_name, A, B)
        self._write_base_matrix(quantized)

    def _init_corda(self, adapter_name: str) -> None:
        """CorDA: the adapter takes r components of the covariance-weighted decomposition
        that ``preprocess_corda`` left on the base layer; the base keeps the rest."""
        from .corda import take_eigens

        self._require_linear("corda")
        if quant.is_quantized(self.get_base_layer()):
            raise ValueError(f"init_lora_weights='corda' needs the full-precision weight, but "
                             f"{type(self.get_base_layer()).__name__} is quantized; run CorDA on the unquantized "
                             "model and quantize the residual model afterwards.")
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        U, S, V = take_eigens(self.get_base_layer(), out_features=self.out_features, in_features=self.in_features, r=r)
        A, B = factors_from_svd(U, S, V.T, s)
        self._set_factors(adapter_name, A, B)
        self._write_base_matrix(self._base_matrix() - s * B @ A)

    def _init_lora_ga(self, adapter_name: str, settings) -> None:
        """LoRA-GA: factors from the gradient ``preprocess_loraga`` left on the base layer; the base
        keeps ``W - scaling · B A``. Without a gradient (loading a saved adapter, or a layer that
        is not linear) the plain init: the factors are overwritten or the layer is not LoRA-GA's."""
        from .loraga import lora_ga_factors, take_gradient

        gradient = take_gradient(self.get_base_layer())
        if gradient is None or not isinstance(self, Linear):
            return self.initialise(adapter_name, True)
        if settings is None:
            raise ValueError("init_lora_weights='lora_ga' needs lora_ga_config=LoraGAConfig(...) in the LoraConfig")
        if quant.is_quantized(self.get_base_layer()):
            raise ValueError("init_lora_weights='lora_ga' rewrites the base weight, which is quantized here; run "
                             "LoRA-GA on the unquantized model")
        gradient = gradient.T if self.fan_in_fan_out else gradient
        weight, s = self._base_matrix(), self.scaling[adapter_name]
        A, B = lora_ga_factors(gradient.to(weight.device), weight, self.r[adapter_name], s, settings)
        dtype = quant.base_weight(self.get_base_layer()).dtype
        A, B = A.to(dtype), B.to(dtype)  # the base keeps exactly what the adapter's precision adds back
        self._set_factors(adapter_name, A, B)
        self._write_base_matrix(weight - s * B.float() @ A.float())

    def _init_olora(self, adapter_name: str) -> None:
        """Orthonormal (QR) factors from the base weight; the base keeps the residual."""
        r, s = self.r[adapter_name], self.scaling[adapter_name]
        weight = self._base_matrix()
        Q, R = torch.linalg.qr(weight)
        B, A = Q[:, :r], R[:r]
        self._set_factors(adapter_name, A, B)
        self._write_base_matrix(weight - s * B @ A)

    def _init_orthogonal(self, adapter_name: str) -> None:
        """A and B built from the two halves of one random orthogonal matrix (even r), so BA = 0."""
        r = self.r[adapter_name]
        if r % 2:
            raise ValueError(f"Orthogonal initialization requires an even LoRA rank, got {r}")
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        odd, even = Q[0::2, :], Q[1::2, :]
        A = (torch.randn(self.in_features, r // 2) @ odd).T / 10.0
        B = (torch.randn(r // 2, self.out_features).T @ even) / 10.0
        self._set_factors(adapter_name, A, B)

    def _set_factors(self, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        dtype = self.lora_A[adapter_name].weight.dtype
        self.lora_A[adapter_name].weight.data = A.contiguous().to(dtype)
        self.lora_B[adapter_name].weight.data = B.contiguous().to(dtype)

    # -- DoRA -------------------------------------------------------------------------

    def lora_matrix(self, adapter_name: str) -> torch.Tensor:
        """B·A as an (out, in·kernel) matrix, unscaled."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        r = A.shape[0]
        return B.reshape(B.shape[0], r) @ A.reshape(r, -1)

    def dora_weight_norm(self, adapter_name: str, weight: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """‖W + sBA‖ per output channel, in the magnitude's layout (W is (out, …))."""
        combined = weight + self.scaling[adapter_name] * lora.reshape(weight.shape).to(weight.dtype)
        return torch.linalg.norm(combined.reshape(combined.shape[0], -1), dim=1).to(weight.dtype)

    def _base_out_in(self) -> torch.Tensor:
        weight = quant.base_weight(self.get_base_layer())
        return weight.T if self.fan_in_fan_out else weight

    def dora_norm(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """‖W + sBA‖ per output channel as the forward uses it: flat, detached (DoRA treats the
        norm as a constant in backward), in ``dtype`` (default: the base weight's).

        Outside training it is kept until the layer's state changes or a tensor it is computed
        from is replaced or edited in place (see ``AdapterLayer.kept``); in training, and in a
        graph that torch.compile traces, it is computed on every call."""
        entry = self._dora_cache_entry(adapter_name, dtype)
        if "norm" not in entry:
            entry["norm"] = self.compute_dora_norm(adapter_name, dtype)
        return entry["norm"]

    def compute_dora_norm(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`dora_norm`, computed now."""
        with torch.no_grad():
            weight = self._base_out_in()
            weight = weight if dtype is None else weight.to(dtype)
            return self.dora_weight_norm(adapter_name, weight, self.lora_matrix(adapter_name))

    def _dora_cache_entry(self, adapter_name: str, dtype: torch.dtype | None) -> dict:
        """Where ``adapter_name``'s forward DoRA values are kept (see ``AdapterLayer.kept``)."""
        if self.training or is_dynamo_compiling():
            return {}
        modules = self._modules
        tensors = [*_own_tensors(self.get_base_layer()), modules["lora_magnitude_vector"][adapter_name].weight]
        if adapter_name in modules["lora_A"]:
            tensors += _own_tensors(modules["lora_A"][adapter_name]) + _own_tensors(modules["lora_B"][adapter_name])
        else:
            tensors += [modules["lora_embedding_A"][adapter_name], modules["lora_embedding_B"][adapter_name]]
        scaling = self.scaling[adapter_name]
        if isinstance(scaling, torch.Tensor):
            tensors.append(scaling)
            scaling = None
        return self.kept(("dora", adapter_name), tensors, (dtype, scaling))

    def create_magnitude(self, adapter_name: str) -> None:
        if self._is_meta(adapter_name):
            shape = self._magnitude_shape()
            self.lora_magnitude_vector[adapter_name] = Magnitude(torch.empty(shape, device="meta"))
            return
        with torch.no_grad():
            weight = self._base_out_in().detach().float()
            lora = self.lora_matrix(adapter_name).float()
            norm = self.dora_weight_norm(adapter_name, weight, lora).reshape(self._magnitude_shape())
        self.lora_magnitude_vector[adapter_name] = Magnitude(norm.to(self.lora_A[adapter_name].weight.dtype))

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    # -- merging ----------------------------------------------------------------------

    def merge_blocker(self) -> str | None:
        for name in self.active_adapters:
            if self.lora_bias.get(name) and getattr(self.get_base_layer(), "bias", None) is None:
                return "lora_bias=True cannot be merged into a base layer without a bias"
            if self.alora.get(name):
                return f"aLoRA adapter {name!r} applies only from its invocation tokens on, which no weight can express"
            if name in self.arrow_config:
                return f"Arrow router {name!r} mixes experts per token, which no weight can express"
        return super().merge_blocker()

    def _orient(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with output channels first (the layout of ``lora_matrix``)."""
        return weight.T if self.fan_in_fan_out else weight

    _unorient = _orient  # a transpose is its own inverse

    def _weight_before_merges(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with every adapter merged so far taken out again (most recent first)."""
        for name in reversed(self.merged_adapters):
            weight = self._unmerged(weight, name)
        return weight

    def _dora_scale(self, adapter_name: str, norm: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        scale = self.lora_magnitude_vector[adapter_name].weight.reshape(-1) / norm
        return scale.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.use_dora.get(adapter_name):
            return weight + self.delta_weight(adapter_name).to(weight.dtype)
        # W' = m / ||W0 + sBA|| * (W + sBA): the norm uses the base W0 without any adapter merged
        # before (plain or DoRA), the scale applies to all of W, exactly as the unmerged forward does
        oriented = self._orient(weight)
        lora = self.lora_matrix(adapter_name).to(weight.dtype).reshape(oriented.shape)
        base = self._orient(self._weight_before_merges(weight)) if self.merged_adapters else oriented
        norm = self.dora_weight_norm(adapter_name, base, lora).detach()
        self._dora_norm[adapter_name] = norm
        scale = self._dora_scale(adapter_name, norm, oriented)
        return self._unorient(scale * (oriented + self.scaling[adapter_name] * lora))

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        unmerged = self._unmerged(weight, adapter_name)
        self._dora_norm.pop(adapter_name, None)
        return unmerged

    def _unmerged(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.use_dora.get(adapter_name):
            return weight - self.delta_weight(adapter_name).to(weight.dtype)
        oriented = self._orient(weight)
        scale = self._dora_scale(adapter_name, self._dora_norm[adapter_name], oriented)
        lora = self.lora_matrix(adapter_name).to(weight.dtype).reshape(oriented.shape)
        return self._unorient(oriented / scale - self.scaling[adapter_name] * lora)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Plain LoRA is a weight delta; DoRA, aLoRA, Arrow and some variants are not."""
        variant = self.variant.get(adapter_name)
        return not (self.use_dora.get(adapter_name) or self.alora.get(adapter_name)
                    or adapter_name in self.arrow_config or (variant is not None and not variant.converts_to_lora))

    def merge_bias(self, adapter_name: str, sign: int) -> None:
        if not self.lora_bias.get(adapter_name) or adapter_name not in self.lora_B:
            return
        base_bias = self.get_base_layer().bias
        with torch.no_grad():
            delta = self.lora_B[adapter_name].bias * self.scaling[adapter_name]
            base_bias.data += sign * delta.to(base_bias.dtype)

    def _cast(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == weight.dtype else x.to(weight.dtype)

    def adapter_state_changed(self) -> None:
        super().adapter_state_changed()
        self.__dict__.pop("_plan", None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.arrow_state.pop(adapter_name, None)

    def initial_scaling(self, adapter: str) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        r = self.r[adapter]
        return self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora.get(adapter) else r)

    def set_scale(self, adapter: str, scale: float) -> None:
        self.adapter_state_changed()
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.initial_scaling(adapter)

    def set_scaling(self, adapter: str, scaling: float) -> None:
        """Set one adapter's scaling; a tensor scaling is filled in place (no new object, so a
        compiled model keeps its graph)."""
        current = self.scaling[adapter]
        if isinstance(current, torch.Tensor):
            current.fill_(float(scaling))
        else:
            self.scaling[adapter] = float(scaling)
            self.adapter_state_changed()

    def scale_layer(self, scale: float) -> None:
        self.adapter_state_changed()
        if scale == 1:
            return
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        self.adapter_state_changed()
        for name in self.active_adapters:
            if name not in self.scaling:
                continue
            if scale is None:
                self.scaling[name] = self.initial_scaling(name)
            else:
                self.scaling[name] /= scale

    # -- combining adapters (add_weighted_adapter) --------------------------------------

    def combination_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` of one adapter as stored (parameters, not copies), or ``None``.

        A has the rank on dim 0 and B on dim 1, whatever the layer type, so that
        ``B.reshape(out, r) @ A.reshape(r, -1)`` is the unscaled delta in (out, in·kernel)
        orientation. Custom layers with other factor layouts override this (or
        :meth:`combine_adapters`)."""
        if adapter_name in self.lora_A:
            return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if adapter_name in self.lora_embedding_A:
            return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return None

    def combination_delta(self, adapter_name: str) -> torch.Tensor:
        """``s · B A`` as a 2-D (out, in·kernel) matrix: the layout the SVD combinations
        work in (no transposition for ``fan_in_fan_out`` or embeddings)."""
        A, B = self.combination_factors(adapter_name)
        r = A.shape[0]
        return (B.detach().reshape(B.shape[0], r) @ A.detach().reshape(r, -1)) * self.scaling[adapter_name]

    def _base_layout_transposed(self) -> bool:
        """Whether the base weight stores (in, out) rather than (out, in)."""
        return bool(self.fan_in_fan_out)

    def combine_adapters(self, adapter_name: str, sources: list[str], weights: list[float], combination_type: str,
                         combination, *, svd_clamp=None, svd_full_matrices: bool = True, svd_driver=None,
                         density=None, majority_sign_method: str = "total") -> None:
        """Overwrite ``adapter_name``'s factors with the combination of ``sources``.

        With s_i the sources' scalings and s the new adapter's own (1 unless rsLoRA):

        * ``cat`` — A = rows-concat(w_i s_i A_i / s), B = cols-concat(B_i), zero-padded;
        * a strategy with ``svd=True`` — applied to the full deltas s_i B_i A_i with
          weights w_i, divided by s, then truncated SVD to this adapter's rank;
        * any other strategy — applied to the A stack with weights sign(w_i)·c_i and to
          the B stack with weights c_i, c_i = √|w_i s_i / s|.

        A ``lora_bias`` becomes Σ w_i s_i b_i / s.
        """
        from peft_kernel import combine

        A_new, B_new = self.combination_factors(adapter_name)
        s_new = self.scaling[adapter_name]
        if not sources:  # no source adapts this layer: the new adapter must not change it
            A_new.zero_()
            B_new.zero_()
            self._combine_bias(adapter_name, sources, weights)
            return
        factors = [self.combination_factors(s) for s in sources]
        scalings = [self.scaling[s] for s in sources]
        kw = {"density": density, "majority_sign_method": majority_sign_method}
        if combination is None and combination_type == "cat":
            As, Bs = [], []
            for (A, B), w, s in zip(factors, weights, scalings, strict=True):
                scaled = A.detach() * w * s
                As.append(scaled / s_new if s_new != 1 else scaled)
                Bs.append(B.detach())
            A_cat, B_cat = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
            A_new.zero_()
            B_new.zero_()
            A_new[: A_cat.shape[0]] = A_cat.to(A_new.dtype)
            B_new[:, : B_cat.shape[1]] = B_cat.to(B_new.dtype)
        elif combination is not None and combination.svd:
            deltas = [self.combination_delta(s) for s in sources]
            # the strategy sees each delta in the base weight's layout (as delta_weight() gives it):
            # that decides which entry each random draw lands on
            transposed = self._base_layout_transposed()
            if transposed:
                deltas = [d.T for d in deltas]
            delta = combination.fn(deltas, torch.tensor(weights).to(deltas[0].device), **kw)
            if transposed:
                delta = delta.T
            if s_new != 1:
                delta = delta / s_new
            B, A = combine.svd_factorize(delta, A_new.shape[0], clamp=svd_clamp, full_matrices=svd_full_matrices,
                                         driver=svd_driver)
            A_new.copy_(A.reshape(A_new.shape))
            B_new.copy_(B.reshape(B_new.shape))
        elif combination is not None:
            weights_A, weights_B = [], []
            for w, s in zip(weights, scalings, strict=True):
                ws = w * s / s_new if s_new != 1 else w * s
                c = math.sqrt(abs(ws))
                weights_A.append(c if ws >= 0 else -c)  # the sign goes on one side only
                weights_B.append(c)
            device = factors[0][0].device
            A = combination.fn([A.detach() for A, _ in factors], torch.tensor(weights_A).to(device), **kw)
            B = combination.fn([B.detach() for _, B in factors], torch.tensor(weights_B).to(device), **kw)
            A_new.copy_(A.to(A_new.dtype))
            B_new.copy_(B.to(B_new.dtype))
        else:
            raise ValueError(f"LoRA has no combination type {combination_type!r}")
        self._combine_bias(adapter_name, sources, weights)

    def _combine_bias(self, adapter_name: str, sources: list[str], weights: list[float]) -> None:
        if adapter_name not in self.lora_B or self.lora_B[adapter_name].bias is None:
            return
        bias = self.lora_B[adapter_name].bias
        total = torch.zeros_like(bias)
        for source, w in zip(sources, weights, strict=True):
            if source in self.lora_B and self.lora_B[source].bias is not None:
                total += self.lora_B[source].bias.detach().to(bias.dtype) * (w * self.scaling[source])
        bias.copy_(total / self.scaling[adapter_name])

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Linear(LoraLayer):
    """LoRA on nn.Linear, transformers Conv1D (``fan_in_fan_out``) and quantized linear layers."""

    supports_routing_variants = True
    supports_variants = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, fan_in_fan_out: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.fan_in_fan_out = (
            getattr(config, "fan_in_fan_out", fan_in_fan_out) if config is not None else fan_in_fan_out
        )
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name], self.lora_B[adapter_name] = _linear_factors(self.in_features, self.out_features,
                                                                             r, lora_bias)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        merged = self._fused_merge(weight, adapter_name, +1)
        return super().merge_weight(weight, adapter_name) if merged is None else merged

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        unmerged = self._fused_merge(weight, adapter_name, -1)
        return super().unmerge_weight(weight, adapter_name) if unmerged is None else unmerged

    def _fused_merge(self, weight: torch.Tensor, adapter_name: str, sign: int) -> torch.Tensor | None:
        """W ± s·BA as one addmm (no delta matrix is materialised); ``None`` for DoRA and
        for factors in another dtype than the weight."""
        A, B = self._update_factors(adapter_name)
        if self.use_dora.get(adapter_name) or not (A.dtype == B.dtype == weight.dtype):
            return None
        if isinstance(self.scaling[adapter_name], torch.Tensor):
            return None
        with torch.no_grad():
            if self.fan_in_fan_out:  # the weight is (in, out)
                return torch.addmm(weight, A.T, B.T, alpha=sign * self.scaling[adapter_name])
            return torch.addmm(weight, B, A, alpha=sign * self.scaling[adapter_name])

    def _update_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with update s·B·A: the factors, or what a variant makes of them."""
        variant = self.variant.get(adapter_name)
        if variant is None:
            return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return variant.update_factors(self, adapter_name)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self._update_factors(adapter_name)
        cast = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        delta = (B @ A) * self.scaling[adapter_name]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.lora_A[adapter_name].weight.dtype) if cast else delta

    def specialised_forward(self):
        # plain adapters (no DoRA, no dropout, nn.Linear factors): F.linear on the factors,
        # and on the base weight too when the base is a plain nn.Linear; one DoRA adapter on a
        # plain nn.Linear: _forward_dora
        base = self._modules["base_layer"]
        active = [name for name in self.active_adapters if name in self.lora_A._modules]
        if len(active) == 1 and self.use_dora.get(active[0]):
            return self._specialise_dora(base, active[0])
        plan = []
        for name in self.active_adapters:
            A, B = self.lora_A._modules.get(name), self.lora_B._modules.get(name)
            if A is None:
                continue
            if (self.alora.get(name) or name in self.arrow_config or isinstance(self.scaling[name], torch.Tensor)
                    or self.use_dora.get(name) or name in self.variant
                    or type(self.lora_dropout[name]) is not nn.Identity
                    or type(A) is not nn.Linear or type(B) is not nn.Linear):
                return None
            plan.append((name, A, B, self.scaling[name]))
        linear_base = type(base) is nn.Linear and not self.fan_in_fan_out
        self.__dict__["_plan"] = (base, tuple(plan), linear_base)
        return self._forward_plain

    def _forward_plain(self, x, *args, **kwargs):
        # runs per layer per call: no nn.Module.__getattr__ (parameters are read from the
        # _parameters dicts), and every precondition of specialised_forward() re-checked
        # (switching adapters, merging, disabling and mixed batches drop this forward: adapter_state_changed)
        base, plan, linear_base = self._plan
        modules = self._modules
        if args or kwargs or self.batch_adapter_names is not None or modules["base_layer"] is not base:
            return self.general_forward(x, *args, **kwargs)
        factors_A, factors_B = modules["lora_A"]._modules, modules["lora_B"]._modules
        dtype = base._parameters["weight"].dtype if linear_base else None
        direct = linear_base and x.dtype == dtype and plain_call(base)
        for name, A, B, _ in plan:
            if factors_A.get(name) is not A or factors_B.get(name) is not B or not plain_call(A) or not plain_call(B):
                return self.general_forward(x, *args, **kwargs)
            direct = direct and A._parameters["weight"].dtype == dtype and B._parameters["weight"].dtype == dtype
        if not direct:  # any base layer (called as a module), factors in their own dtype
            result = base(x)
            for _, A, B, scaling in plan:
                A_weight, B_params = A._parameters["weight"], B._parameters
                out = F.linear(F.linear(x if x.dtype == A_weight.dtype else x.to(A_weight.dtype), A_weight),
                               B_params["weight"], B_params["bias"])
                result = torch.add(result, out if out.dtype == result.dtype else out.to(result.dtype), alpha=scaling)
            return result
        params = base._parameters
        result = F.linear(x, params["weight"], params["bias"])
        if torch.is_grad_enabled():
            for _, A, B, scaling in plan:
                B_params = B._parameters
                out = F.linear(F.linear(x, A._parameters["weight"]), B_params["weight"], B_params["bias"])
                result = torch.add(result, out, alpha=scaling)
            return result
        # inference: add s·(xA)Bᵀ into the fresh result in place, one addmm per adapter
        flat = result.view(-1, result.shape[-1])
        for _, A, B, scaling in plan:
            B_params = B._parameters
            xa = F.linear(x, A._parameters["weight"])
            flat.addmm_(xa.view(-1, xa.shape[-1]), B_params["weight"].t(), alpha=scaling)
            if B_params["bias"] is not None:
                flat.add_(B_params["bias"], alpha=scaling)
        return result

    def _specialise_dora(self, base: nn.Module, name: str):
        A, B = self.lora_A._modules[name], self.lora_B._modules[name]
        magnitude = self.lora_magnitude_vector._modules.get(name)
        if (self.alora.get(name) or name in self.arrow_config or isinstance(self.scaling[name], torch.Tensor)
                or magnitude is None or type(A) is not nn.Linear or type(B) is not nn.Linear
                or type(base) is not nn.Linear or self.fan_in_fan_out):
            return None
        self.__dict__["_plan"] = (base, name, A, B, magnitude, type(self.lora_dropout[name]) is nn.Identity)
        return self._forward_dora

    def _forward_dora(self, x, *args, **kwargs):
        # DoRA on a plain nn.Linear, with scale = m / ‖W + sBA‖ (per output channel):
        #   out = scale · (xWᵀ + s·(xAᵀ)Bᵀ) + b + s·scale·b_B
        # Beyond the base matmul: two rank-r matmuls (the second accumulated in place) and one
        # pass over the output (HF PEFT's forward makes about six, and forms W + sBA). The norm
        # is kept outside training (dora_norm). Preconditions re-checked as in _forward_plain.
        base, name, A, B, magnitude, no_dropout = self._plan
        modules = self._modules
        if (args or kwargs or self.batch_adapter_names is not None or modules["base_layer"] is not base
                or (self.training and not no_dropout) or modules["lora_A"]._modules.get(name) is not A
                or modules["lora_B"]._modules.get(name) is not B
                or modules["lora_magnitude_vector"]._modules.get(name) is not magnitude
                or not (plain_call(base) and plain_call(A) and plain_call(B))):
            return self.general_forward(x, *args, **kwargs)
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        A_weight, B_weight, B_bias = A._parameters["weight"], B._parameters["weight"], B._parameters["bias"]
        if not (x.dtype == weight.dtype == A_weight.dtype == B_weight.dtype):
            return self.general_forward(x, *args, **kwargs)
        scaling = self.scaling[name]
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, weight)  # 2-D: added to in place below, which on a view would cost autograd a copy
        out.addmm_(F.linear(rows, A_weight), B_weight.t(), alpha=scaling)  # nothing saved xWᵀ for backward
        out = out.view(*x.shape[:-1], out.shape[-1])
        if torch.is_grad_enabled():
            scale = magnitude._parameters["weight"] / self.dora_norm(name, x.dtype)
            shift = _dora_shift(bias, B_bias, scaling, scale)
            return out * scale if shift is None else torch.addcmul(shift, out, scale)
        scale, shift = self._dora_inference_terms(name, bias, B_bias, magnitude, x.dtype)
        return out.mul_(scale) if shift is None else torch.addcmul(shift, out, scale, out=out)

    def _dora_inference_terms(self, name, bias, B_bias, magnitude, dtype):
        """``(scale, shift)`` of :meth:`_forward_dora` without gradients, kept with the norm."""
        entry = self._dora_cache_entry(name, dtype)
        if "terms" not in entry:
            with torch.no_grad():
                scale = magnitude.weight / self.dora_norm(name, dtype)
                entry["terms"] = scale, _dora_shift(bias, B_bias, self.scaling[name], scale)
        return entry["terms"]

    def compute_dora_norm(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self._base_out_in()
        dtype = weight.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):  # half precision: W + sBA in that dtype, as HF PEFT
            return super().compute_dora_norm(adapter_name, dtype)
        # ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·(WAᵀ)_i·B_i + s²·B_i(AAᵀ)B_iᵀ: no (out × in) matrix
        # beyond W itself, and a pass over W less than forming W + sBA
        with torch.no_grad():
            weight = weight.to(dtype)
            A, B = self.lora_A[adapter_name].weight.to(dtype), self.lora_B[adapter_name].weight.to(dtype)
            scaling = self.scaling[adapter_name]
            tensors = _own_tensors(self.get_base_layer())  # ‖W‖² is kept in training too while W is frozen
            frozen = not any(t.requires_grad for t in tensors)
            kept = self.kept("dora base rows", tensors, (dtype, self.fan_in_fan_out), in_training=frozen)
            if "rows" not in kept:
                kept["rows"] = torch.linalg.vector_norm(weight, dim=1).square()
            squared = (kept["rows"]
                       + (2 * scaling) * torch.linalg.vecdot(weight @ A.T, B)
                       + (scaling * scaling) * torch.linalg.vecdot(B @ (A @ A.T), B))
            return squared.clamp_min(0).sqrt()

    def batched_forward(self, x, row_adapter, adapter_names, *args, **kwargs):
        # a mixed batch in one pass (batched.py); the variants, active dropout and subclasses with
        # math of their own (another adapter_forward) take the per-adapter path
        if type(self).adapter_forward is not Linear.adapter_forward or not batched.takes_batch(self, adapter_names):
            return None
        # stacks that can be kept hold all of the layer's adapters, for batches of any
        # composition; where nothing is kept (autograd recording: no history may be kept;
        # training; torch.compile) the batch's adapters are stacked on every call
        keep = not (self.training or is_dynamo_compiling())
        if keep and torch.is_grad_enabled():
            _, factors = batched.factors(self, adapter_names)
            keep = not any(t.requires_grad for factor in factors for t in factor if isinstance(t, torch.Tensor))
        names, factors = batched.factors(self, None if keep else adapter_names)
        tensors = [t for factor in factors for t in factor if isinstance(t, torch.Tensor)]
        floats = tuple(None if isinstance(s, torch.Tensor) else s for *_, s in factors)
        kept = self.kept(batched.STACKS, tensors, (names, floats)) if keep else {}
        if "stacks" not in kept:
            kept["stacks"] = batched.stack_factors(factors)
            kept["position"] = {name: i for i, name in enumerate(names)}
        stacks = kept["stacks"]
        if stacks is None:  # factors in several dtypes or on several devices
            return None
        if names != adapter_names:  # rows index the batch's adapters: map them to the stacks'
            position = kept["position"]
            lookup = [position[name] for name in adapter_names] + [len(names)]
            row_adapter = torch.tensor(lookup, device=row_adapter.device)[row_adapter]
        base = self._modules["base_layer"]
        result = base(x, *args, **kwargs)
        fresh = type(base) is nn.Linear and plain_call(base) and not torch.is_grad_enabled()
        return batched.add_rows(result, x, stacks, row_adapter, in_place=fresh)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        if adapter_name in self.arrow_config:
            return result + arrow.router_delta(self, adapter_name, x).to(result.dtype)
        if self.alora.get(adapter_name):
            return self._alora_forward(x, result, adapter_name)
        variant = self.variant.get(adapter_name)
        if variant is not None:
            return variant.forward(self, x, result, adapter_name)
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self._cast(x, A.weight)
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        if not self.use_dora[adapter_name]:
            if not isinstance(dropout, nn.Identity):
                x = dropout(x)
            out = B(A(x)) * scaling
            return result + (out if out.dtype == result.dtype else out.to(result.dtype))
        if isinstance(dropout, nn.Identity) or not self.training:  # the base result can be reused
            return self._dora_result(x, result, adapter_name)
        x = dropout(x)
        return result + self._dora_output(x, None, adapter_name).to(result.dtype)

    def _alora_forward(self, x, result, adapter_name):
        """Add s·BA x to the tokens from the invocation on; the others keep the base output."""
        offsets = self.call_state.get(alora.OFFSETS, {}).get(adapter_name)
        if offsets is None:  # no invocation known in this call: the base model
            return result
        rows = self.batch_rows
        if rows is not None:  # one adapter's rows of a mixed batch
            offsets = [offsets[i] for i in rows.tolist()]
        index = alora.adapted_rows(offsets, result.shape, result.device)
        flat_x, flat = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        chosen = self.lora_dropout[adapter_name](self._cast(flat_x.index_select(0, index), A.weight))
        out = B(A(chosen)) * self.scaling[adapter_name]
        return flat.index_add(0, index, out.to(flat.dtype)).reshape(result.shape)

    def _dora_result(self, x, result, adapter_name):
        """``result`` (the base output, plus the adapters before) with DoRA adapter
        ``adapter_name``: scale·(result − b + s·B(A x)) + b, with scale = m / ‖W + sBA‖."""
        if result.dtype != x.dtype:
            return result + self._dora_output(x, result, adapter_name).to(result.dtype)
        scaling = self.scaling[adapter_name]
        lora = self.lora_B[adapter_name](self.lora_A[adapter_name](x))
        scale = self.lora_magnitude_vector[adapter_name].weight / self.dora_norm(adapter_name, x.dtype)
        adapted = result + lora * scaling  # no alpha=: inductor (torch 2.13) drops it after a matmul
        bias = self.get_base_layer().bias
        return adapted * scale if bias is None else torch.addcmul(bias - bias * scale, adapted, scale)

    def _dora_output(self, x, base_result, adapter_name):
        """What DoRA adds to the output: (scale − 1)·(base result without bias) + scale·s·B(A x)."""
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        scaling = self.scaling[adapter_name]
        scale = (self.lora_magnitude_vector[adapter_name].weight / self.dora_norm(adapter_name, x.dtype)).view(1, -1)
        if base_result is None:
            base_result = F.linear(x, self._base_out_in().to(x.dtype))
        else:
            bias = self.get_base_layer().bias
            base_result = base_result - bias if bias is not None else base_result
        return (scale - 1) * base_result + scale * B(A(x)) * scaling


class Embedding(LoraLayer):
    """LoRA on nn.Embedding: ``lora_embedding_A`` (r × vocab) is looked up, then mapped by
    ``lora_embedding_B`` (dim × r)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config=None, **kwargs: Any) -> None:
        if getattr(config, "lora_bias", kwargs.get("lora_bias", False)):
            raise ValueError("lora_bias=True is not supported for Embedding layers; set lora_bias=False or leave the "
                             "embeddings out of target_modules")
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))

    def lora_matrix(self, adapter_name: str) -> torch.Tensor:
        return self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]  # (dim, vocab)

    def _base_layout_transposed(self) -> bool:
        return True  # the embedding matrix is (vocab, dim)

    def _base_out_in(self) -> torch.Tensor:
        return self.get_base_layer().weight.T  # (dim, vocab)

    def _is_meta(self, adapter_name: str) -> bool:
        item = self.lora_embedding_A.get(adapter_name) if adapter_name in self.lora_embedding_A else None
        return item is not None and item.device.type == "meta"

    def create_magnitude(self, adapter_name: str) -> None:
        if self._is_meta(adapter_name):
            self.lora_magnitude_vector[adapter_name] = Magnitude(torch.empty(self.out_features, device="meta"))
            return
        with torch.no_grad():
            weight = self._base_out_in().detach().float()
            norm = self.dora_weight_norm(adapter_name, weight, self.lora_matrix(adapter_name).float())
        self.lora_magnitude_vector[adapter_name] = Magnitude(norm.to(self.lora_embedding_A[adapter_name].dtype))

    def _set_factors(self, adapter_name, A, B):
        raise ValueError("pissa/olora/orthogonal initialisation is only supported for linear layers")

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_matrix(adapter_name) * self.scaling[adapter_name]).T

    def _orient(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # the embedding table is (vocab, dim); channels are its columns

    _unorient = _orient

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        scaling = self.scaling[adapter_name]
        after_A = self._embed(x, A.T)
        if not self.use_dora[adapter_name]:
            return result + (after_A @ B.T * scaling).to(result.dtype)
        scale = self.lora_magnitude_vector[adapter_name].weight / self.dora_norm(adapter_name)
        return (scale * result + scale * (after_A @ B.T) * scaling).to(result.dtype)


class _ConvNd(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d: A is a conv with the base's kernel, B a 1×…×1 conv."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        groups = self.get_base_layer().groups
        if groups > 1:
            warnings.warn("LoRA on a conv layer with groups > 1 cannot be merged.", PeftWarning, stacklevel=2)
        if r % groups:
            raise ValueError(f"LoRA rank {r} must be divisible by groups={groups} of "
                             f"{type(self.get_base_layer()).__name__}")
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         dilation=base.dilation, bias=False)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _magnitude_shape(self):
        return (1, self.out_features) + (1,) * (self.get_base_layer().weight.dim() - 2)

    # A grouped base conv (groups = g) has a block-diagonal weight: output group j reads input
    # group j only. B (a grouped 1×…×1 conv) maps group j of A's r outputs to output group j,
    # while A reads every input channel, so B·A is a dense (out, in·kernel) matrix. DoRA's
    # per-channel norm is taken on the dense weight W + s·B·A, W's blocks in place.

    def lora_matrix(self, adapter_name: str) -> torch.Tensor:
        groups = self.get_base_layer().groups
        if groups == 1:
            return super().lora_matrix(adapter_name)
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        r = A.shape[0]
        A = A.reshape(groups, r // groups, -1)  # (g, r/g, in·kernel)
        B = B.reshape(groups, B.shape[0] // groups, r // groups)  # (g, out/g, r/g)
        return (B @ A).reshape(-1, A.shape[-1])

    def dora_weight_norm(self, adapter_name: str, weight: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        return super().dora_weight_norm(adapter_name, self._dense(weight), lora)

    def _dense(self, weight: torch.Tensor) -> torch.Tensor:
        """A grouped conv weight (out, in/g, …) as the equivalent dense one (out, in, …)."""
        groups = self.get_base_layer().groups
        if groups == 1:
            return weight
        out, in_per_group = weight.shape[:2]
        dense = weight.new_zeros((out, in_per_group * groups) + tuple(weight.shape[2:]))
        rows = out // groups
        for group in range(groups):
            block = slice(group * rows, (group + 1) * rows)
            dense[block, group * in_per_group:(group + 1) * in_per_group] = weight[block]
        return dense

    def merge_blocker(self) -> str | None:
        if self.get_base_layer().groups > 1:
            return "merging is not supported for conv layers with groups > 1"
        return super().merge_blocker()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return (self.lora_matrix(adapter_name) * self.scaling[adapter_name]).reshape(weight.shape)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        A, B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        x = self._cast(x, A.weight)
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        if not self.use_dora[adapter_name]:
            return result + (B(A(dropout(x))) * scaling).to(result.dtype)
        reuse = isinstance(dropout, nn.Identity) or not self.training
        if not reuse:
            x = dropout(x)
        base = self.get_base_layer()
        weight = base.weight
        scale = (self.lora_magnitude_vector[adapter_name].weight.reshape(-1) / self.dora_norm(adapter_name)).view(
            (1, -1) + (1,) * (weight.dim() - 2))
        if reuse:
            base_result = result
            if base.bias is not None:
                base_result = base_result - base.bias.view((1, -1) + (1,) * (result.dim() - 2))
        else:
            base_result = base._conv_forward(x, weight, None)
        return result + ((scale - 1) * base_result + scale * B(A(x)) * scaling).to(result.dtype)


class Conv1d(_ConvNd):
    pass


class Conv2d(_ConvNd):
    pass


class Conv3d(_ConvNd):
    pass


#: nn.MultiheadAttention attributes the LoRA wrapper reads through from the module it wraps
_MHA_ATTRIBUTES = frozenset({
    "embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
    "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj", "bias_k",
    "bias_v", "add_zero_attn", "merge_masks",
})


class MultiheadAttention(LoraLayer):
    """LoRA on nn.MultiheadAttention (equal q/k/v dims): one adapter on the packed input
    projection and one on ``out_proj``. Forward runs the attention with the adapted
    weights as tensors, so gradients reach both adapters and the module is never mutated."""

    supports_mixed_batch = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, **kwargs: Any) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("LoRA supports nn.MultiheadAttention only with equal query/key/value dimensions")
        if getattr(config, "use_dora", False):
            raise ValueError("DoRA is not supported for nn.MultiheadAttention; set use_dora=False")
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, r=r, lora_alpha=lora_alpha,
                                          config=config, **kwargs)
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name, r, lora_alpha, config=None, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, Linear):  # (re)initialised after in_proj: HF PEFT's random order
            out_proj.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name, r, lora_bias):
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in _MHA_ATTRIBUTES:
                raise
        return getattr(self.get_base_layer(), name)  # code reading the attention's own attributes

    def delta_weight(self, adapter_name):
        return (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * self.scaling[adapter_name]

    def merge_blocker(self):
        return None

    def check_safe_merge(self, adapter_names) -> None:
        weight = self.get_base_layer().in_proj_weight.detach()
        for name in adapter_names:
            if name in self.lora_A and name not in self.merged_adapters:
                weight = weight + self.delta_weight(name).to(weight.dtype)
                if not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs or infs detected when merging adapter {name!r}; nothing was merged")

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        names = self.adapters_to_merge(adapter_names)
        base = self.get_base_layer()
        for name in names:
            if name not in self.lora_A:
                continue
            merged = base.in_proj_weight.data + self.delta_weight(name).to(base.in_proj_weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs detected when merging adapter {name!r}")
            base.out_proj.merge(safe_merge=safe_merge, adapter_names=[name])
            base.in_proj_weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", PeftWarning, stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base.in_proj_weight.data -= self.delta_weight(name).to(base.in_proj_weight.dtype)
        base.out_proj.unmerge()

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode)
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, AdapterLayer):
            out_proj.set_adapter(adapter_names, inference_mode)

    def forward(self, query, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        if self.batch_adapter_names is not None:
            raise TypeError("LoRA on nn.MultiheadAttention does not support mixed adapter batches")
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            if self.disable_adapters and self.merged:
                self.unmerge()
            return base(query, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.lora_A]
        if not active:
            return base(query, *args, **kwargs)
        in_w = base.in_proj_weight + sum(self.delta_weight(n).to(base.in_proj_weight.dtype) for n in active)
        out_layer = base.out_proj.get_base_layer()
        out_w = out_layer.weight + sum(base.out_proj.delta_weight(n).to(out_layer.weight.dtype) for n in active)
        return _mha_forward(base, in_w, out_w, query, *args, **kwargs)


def _mha_forward(mha: nn.MultiheadAttention, in_proj_weight, out_proj_weight, query, key=None, value=None,
                 key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
                 is_causal=False):
    key = query if key is None else key
    value = key if value is None else value
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, in_proj_weight, mha.in_proj_bias,
        mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, out_proj_weight,
        mha.out_proj.get_base_layer().bias if isinstance(mha.out_proj, AdapterLayer) else mha.out_proj.bias,
        training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    if mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


class ParamWrapper(LoraLayer, ParameterLayer):
    """LoRA on a bare ``nn.Parameter`` (``target_parameters``). The module reads W + ΔW
    while it runs; merging writes ΔW into the parameter.

    A 2-D parameter is one (out × in) matrix: ΔW = s·BA as for nn.Linear. A 3-D parameter
    stacks E experts (dim 0), each (out × in), or (in × out) when the module says
    ``is_transposed = True``; expert e gets ΔW_e = s·B_e A_e with A_e the rows e·r … e·r + r − 1
    of ``lora_A`` (rE × in) and B_e the columns e, E + e, 2E + e, … of ``lora_B`` (out × rE),
    HF PEFT's checkpoint layout. No dropout, bias, DoRA or ``fan_in_fan_out``: the update is
    folded into a weight, so it cannot see the input.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 0,
                 lora_alpha: float = 1, config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, parameter_name=parameter_name, adapter_name=adapter_name, **kwargs)
        shape = self.parameter().shape
        transposed = len(shape) == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        if len(shape) == 2:
            experts, (out_features, in_features) = 1, shape
        elif len(shape) == 3:
            experts = shape[0]
            in_features, out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        else:
            raise ValueError(f"LoRA adapts 2-D and 3-D parameters only; {parameter_name!r} has shape {tuple(shape)}")
        self.set_plain_attributes(in_features=in_features, out_features=out_features, num_experts=experts,
                                  param_transposed=transposed)
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        rank = r * self.num_experts
        self.lora_A[adapter_name], self.lora_B[adapter_name] = _linear_factors(self.in_features, self.out_features,
                                                                             rank, False)

    def _expert_factors(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ΔW = s·left @ right in the parameter's layout (per expert)."""
        A, B = self.lora_A[adapter_name].weight.to(dtype), self.lora_B[adapter_name].weight.to(dtype)
        experts = self.num_experts
        A = A.reshape(experts, -1, A.shape[-1])  # (E, r, in)
        B = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        if self.param_transposed:
            return A.transpose(1, 2), B.transpose(1, 2)
        return B, A

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.num_experts == 1 and self.parameter().dim() == 2:
            A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            return (B @ A) * self.scaling[adapter_name]
        left, right = self._expert_factors(adapter_name, self.lora_A[adapter_name].weight.dtype)
        return (left @ right) * self.scaling[adapter_name]

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        scaling = self.scaling[adapter_name]
        if weight.dim() == 3 and not isinstance(scaling, torch.Tensor):
            # W + s·left @ right as one baddbmm: no expert-stack-sized delta per forward
            left, right = self._expert_factors(adapter_name, weight.dtype)
            return torch.baddbmm(weight, left, right, alpha=scaling)
        return weight + self.delta_weight(adapter_name).to(weight.dtype)
