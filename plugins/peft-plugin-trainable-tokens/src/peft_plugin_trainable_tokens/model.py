"""``TrainableTokensModel`` (the method's tuner) and :func:`add_trainable_tokens`, the same rows
trained next to another method's adapter (e.g. a LoRA config's ``trainable_token_indices``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn

from peft_kernel import AdapterLayer, BaseTuner
from peft_kernel.targeting import is_target

from .layer import TiedTrainableTokensLayer, TrainableTokensLayer


def input_embeddings_name(model: nn.Module, default: str = "embed_tokens") -> str:
    """The qualified name of ``model.get_input_embeddings()``, else ``default``."""
    embeddings = _input_embeddings(model)
    return next((name for name, module in model.named_modules() if module is embeddings), default)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _plain_modules(model: nn.Module):
    """``(name, module)`` of the modules outside adapter layers, adapter layers included."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, AdapterLayer):
            inside += (name + ".",)
        yield name, module


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def tie_to_embeddings(model: nn.Module, layer: TrainableTokensLayer, adapter_name: str, saved: bool = True,
                      apart: Iterable[str] = ()) -> None:
    """Wrap every module sharing ``layer``'s weight (a tied output head; wrapped already or not),
    except those named in ``apart``, in a :class:`TiedTrainableTokensLayer` that applies ``layer``'s
    adapters."""
    weight = layer.get_base_layer().weight
    for name, module in list(_plain_modules(model)):
        if module is layer or name in apart or isinstance(module, TiedTrainableTokensLayer):
            continue
        base = module.get_base_layer() if isinstance(module, TrainableTokensLayer) else module
        if isinstance(base, AdapterLayer) or getattr(base, "weight", None) is not weight:
            continue
        _set(model, name, TiedTrainableTokensLayer(base, layer, adapter_name, saved))


def add_trainable_tokens(model: nn.Module, adapter_name: str, token_indices: list[int] | dict[str, list[int]], *,
                         targets=None, tie: bool = True, save_tied: bool = False,
                         require_tie: bool = False) -> list[str]:
    """Make rows of embedding matrices trainable for ``adapter_name``, next to another method's adapter.

    ``token_indices`` is a list of token ids of the input embeddings, or ``{module name: ids}``
    (a name matches a module whose qualified name is it or ends in ``"." + name``). Each module
    gets a :class:`TrainableTokensLayer` (or the new adapter, if it has one); the rows start as the
    current ones. With ``tie`` the modules sharing the input embeddings' weight follow the input
    embeddings' rows (listed in checkpoints under their own names too only with ``save_tied``: HF
    PEFT's LoRA does not), unless they are listed with other ids, which breaks the tie (refused
    with ``require_tie``). ``targets``: the caller's config; a module it targets is refused (it cannot
    be adapted and have trainable rows at once). The caller's tuner must count ``PREFIX``
    (``"trainable_tokens_"``) among its ``adapter_prefixes`` so that the rows train.

    Returns the names of the adapted modules. Raises ``ValueError``, before changing the model, when
    a name matches nothing, a targeted module or one that another method adapts.
    """
    if not isinstance(token_indices, dict):
        token_indices = {input_embeddings_name(model): token_indices}
    plan = []
    for wanted, indices in token_indices.items():
        matches = [(name, module) for name, module in _plain_modules(model)
                   if name == wanted or name.endswith("." + wanted)]
        if not matches:
            raise ValueError(f"trainable_token_indices names {wanted!r}, which matches no module of the model; use a "
                             "module name from model.named_modules() (e.g. 'embed_tokens')")
        for name, module in matches:
            if isinstance(module, TiedTrainableTokensLayer):
                module = module.get_base_layer()
            if targets is not None and is_target(targets, name) or (
                    isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer)):
                raise ValueError(f"{name!r} is a target of the adapter, so its rows cannot also train; "
                                 "remove it from target_modules or from trainable_token_indices")
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2:
                raise ValueError(f"{name!r} ({type(module).__name__}) has no 2-D weight whose rows are tokens; "
                                 "trainable tokens need an embedding (or a tied output head)")
            plan.append((name, module, indices))
    embeddings = _input_embeddings(model)
    embedding_ids = next((list(ids) for _, module, ids in plan if module is embeddings), None)
    shared = getattr(embeddings, "weight", None)
    apart = {name: ids for name, module, ids in plan if module is not embeddings and embedding_ids is not None
             and getattr(module, "weight", None) is shared and list(ids) != embedding_ids}
    if apart and tie and require_tie:
        raise ValueError(f"{sorted(apart)} share the input embeddings' weight but list other token ids "
                         f"({apart}) than the embeddings ({embedding_ids}), so they cannot stay tied; list the same "
                         "ids for all of them, or do not ask for the tie (ensure_weight_tying=False)")
    layers = []
    for name, module, indices in plan:
        if isinstance(module, TrainableTokensLayer):
            module.update_layer(adapter_name, token_indices=indices)
        else:
            module = TrainableTokensLayer(module, adapter_name, token_indices=indices)
        _set(model, name, module)
        layers.append(module)
    embeddings = _input_embeddings(model)
    if tie and embeddings in layers:
        tie_to_embeddings(model, embeddings, adapter_name, save_tied, apart)
    return [name for name, *_ in plan]


class TrainableTokensModel(BaseTuner):
    prefix = "trainable_tokens_"
    layer_cls = TrainableTokensLayer
    supported_layer_types = ("torch.nn.Embedding", "a tied output head (torch.nn.Linear)")

    def _prepare_adapter_config(self, config, model_config):
        """No ``target_modules``: the model's input embeddings."""
        if config.target_modules is None:
            config = copy.copy(config)
            config.target_modules = input_embeddings_name(self.model)
        return config

    def _after_layer_created(self, layer, adapter_name, config) -> None:
        """A module sharing the input embeddings' weight (a tied head) follows their rows, also when
        it is targeted itself."""
        embeddings = _input_embeddings(self.model)
        if isinstance(embeddings, TrainableTokensLayer) and embeddings.has_adapter(adapter_name):
            tie_to_embeddings(self.model, embeddings, adapter_name)
