"""The plugin contract of peft-kernel: every hook a plugin may implement.

Read this module top to bottom and you know everything the kernel will ask of a plugin.
A plugin is a module (or object) whose functions are decorated with
``@peft_kernel.hookimpl`` and named like the specs below. First-party plugins
(the method plugins and the quantization backends shipped with peft-kernel) use exactly this contract; there is
no back door.

There are five families:

1. method registration       ``peft_kernel_register_methods``
2. layer dispatch            ``peft_kernel_dispatch_layer``
3. merge / combination       ``peft_kernel_register_combinations``
4. state-dict key mapping    ``peft_kernel_adapter_state_dict``, ``peft_kernel_load_state_dict``
5. quantization backends     ``peft_kernel_register_quant_backends``

Registration hooks hand the plugin a ``register`` callable (rather than asking it to
return a structure), so a plugin can register zero, one or many things and the kernel
validates each one where it is registered.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("peft_kernel")


# -- 1. method registration -------------------------------------------------------------


@hookspec
def peft_kernel_register_methods(register):
    """Declare the PEFT methods this plugin provides.

    Called once, when the kernel first needs the method registry.

    :param register: ``register(*, name, config_cls, model_cls, prefix=None,
        is_mixed_compatible=False)`` — the same keywords as
        :func:`peft_kernel.register_peft_method`. ``name`` is the lower-case method name;
        the method id (``peft_type``, as written to ``adapter_config.json``) is
        ``name.upper()``. ``prefix`` defaults to ``name + "_"`` and must equal
        ``model_cls.prefix``. ``model_cls`` is the tuner class (a subclass of
        :class:`peft_kernel.BaseTuner`) or, for prompt learning, a prompt encoder class
        (``config_cls`` then subclasses :class:`peft_kernel.PromptLearningConfig`): an
        ``nn.Module`` built as ``model_cls(config, word_embeddings)`` whose ``forward(indices)``
        returns the virtual-token embeddings. Everything else about prompt learning (inputs,
        masks, labels, ``generate``, checkpoints) is the kernel's; see
        :mod:`peft_kernel.prompt_learning` for the encoder contract.

    ``model_cls`` and ``config_cls`` may each be given as a class or as a lazy
    ``"package.module:QualName"`` string (e.g. ``model_cls="peft_plugin_x.model:XModel"``).
    A string is imported the first time the kernel needs the class (building a model,
    loading an adapter) and then cached; a ``model_cls`` string is checked against
    ``prefix`` at that moment, and one that cannot be imported raises ``ImportError``
    naming the method and the plugin. Use a string for ``model_cls`` (anything that imports
    torch) and keep the entry-point module torch-free, so that ``import peft_kernel`` and
    plugin discovery do not import torch; configs are usually torch-free and can be
    passed as classes.

    Registering a ``peft_type`` that another plugin already registered raises
    ``KeyError``; the offending plugin is reported as broken and the first one stays.
    """


# -- 2. layer dispatch ------------------------------------------------------------------


@hookspec(firstresult=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    """Return the adapter layer that should replace ``target``, or ``None``.

    Called for every module that target matching selected, when the module is not
    already an adapter layer of the method (then the kernel calls
    ``layer.update_layer`` instead). The first non-``None`` result wins. Order:

    * user mappings (``register_layer_mapping`` and ``config.register_custom_module``)
      are tried first — the kernel implements them as a ``tryfirst`` hook;
    * plugins implementing this hook without ordering flags come next (a quantization
      backend that needs its own wrapper class goes here);
    * method plugins implement their built-in layer table with ``trylast=True``;
    * last, where every hook returned ``None``, the kernel builds the tuner's ``layer_cls`` if
      the tuner sets ``dispatch_types`` (linear-like targets and those types): a method with one
      layer class needs no dispatch hook at all.

    :param target: the module to adapt. In a mixed model it can be an adapter layer of another
        method: decide on the type of :func:`peft_kernel.dispatch.base_of` ``(target)`` (the
        module at the bottom of the chain; the dispatch helpers do) and wrap ``target`` itself.
    :param target_name: its qualified name in the base model (``"model.layers.0.q_proj"``).
    :param adapter_name: name of the adapter being created.
    :param config: the method's config instance; dispatch on ``config.peft_type``.
    :returns: a new adapter layer (subclass of :class:`peft_kernel.AdapterLayer`)
        holding ``target`` as its ``base_layer``, or ``None`` when the plugin does not
        handle this combination. If every plugin returns ``None`` the kernel raises a
        ``ValueError`` naming the module, its type and the supported types.
    """


# -- 3. merge / combination -------------------------------------------------------------


@hookspec
def peft_kernel_register_combinations(register):
    """Declare strategies for ``add_weighted_adapter(combination_type=...)``.

    :param register: ``register(name, fn, *, svd=False)``. ``fn(tensors, weights, **kw)``
        combines a list of same-shaped tensors with per-tensor weights into one tensor
        (``kw`` carries ``density`` and ``majority_sign_method``). With ``svd=False`` a
        low-rank method applies ``fn`` factor-wise (to the stacked A factors and the
        stacked B factors); with ``svd=True`` it applies ``fn`` to the full deltas and
        re-factorises the result with a truncated SVD. Registering an existing name
        raises ``KeyError``.

    Folding an adapter into its base weight needs no hook: the kernel asks the layer for
    ``merge_weight`` / ``unmerge_weight`` (default: add / subtract ``delta_weight``) and
    the quantization backend for the (de)quantized weight.
    """


# -- 4. state-dict key mapping ----------------------------------------------------------


@hookspec
def peft_kernel_adapter_state_dict(model, config, adapter_name, state_dict):
    """Adjust the adapter state dict that is about to be saved, in place.

    The kernel has already selected the adapter's tensors (every tensor of every adapter
    layer except its ``base_layer``, the ``modules_to_save`` copies, and the tuner's
    shared buffers), dropped other adapters' tensors and stripped the adapter name, so
    ``state_dict`` holds keys in HF PEFT checkpoint form. Implement this to rename keys
    or drop tensors your method does not save (e.g. optional shared projections).

    :param model: the tuner (``PeftModel.base_model``).
    :param config: the adapter's config; check ``config.peft_type`` first.
    :param adapter_name: the adapter being saved.
    :param state_dict: ``{key: tensor}``; mutate it, the return value is ignored.
    """


@hookspec
def peft_kernel_load_state_dict(model, config, adapter_name, state_dict):
    """Adjust a checkpoint state dict before it is loaded, in place.

    Called after the kernel read the file and before it inserts the adapter name back
    into the keys; implement the inverse of :func:`peft_kernel_adapter_state_dict` here
    (e.g. re-add a suffix, check or regenerate shared buffers).
    """


# -- 5. quantization backends -----------------------------------------------------------


@hookspec
def peft_kernel_register_quant_backends(register):
    """Declare quantization backends.

    :param register: ``register(backend)`` where ``backend`` is a
        :class:`peft_kernel.quant.QuantBackend`: it recognises quantized layers
        (``matches``) and provides their shape, dequantized weight, compute dtype and,
        where possible, requantization (``set_weight``) so that every method can
        forward through and merge into quantized bases without knowing the backend.

    Importing the quantization library belongs inside the backend's methods, not at
    plugin import time: a backend must be registrable when its library is missing, and
    then reports ``available() -> (False, reason)``. The same goes for torch: this hook runs
    during plugin listing (``peft-kernel plugins``), so import torch inside the methods too.
    """
