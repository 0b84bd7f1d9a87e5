"""Warning category shared by the kernel and its plugins."""


class PeftWarning(UserWarning):
    """Something about an adapter that the user should know but that is not an error."""


class NoMatchingPeftModuleError(ValueError):
    """No module of the model matched an adapter's targets (HF PEFT's name for it)."""


class UnsupportedFeatureError(ValueError, NotImplementedError):
    """A method or layer does not support what was asked (e.g. targeting bare parameters);
    raised before anything changes. Both a ``ValueError`` and the ``NotImplementedError``
    HF PEFT raises there, so code written against either convention catches it."""


class MergeNotSupportedError(UnsupportedFeatureError):
    """An adapter cannot be folded into this base layer; raised before anything changes.

    It is both a ``ValueError`` and a ``NotImplementedError`` so code written against
    either convention catches it.
    """


class ConfigTypeError(TypeError, ValueError):
    """A config field holds a value of the wrong type; raised when the config is built.

    It is both a ``TypeError`` (what it is) and a ``ValueError`` (what bad config values
    raise otherwise), so code written against either convention catches it.
    """


class StateDictMismatchError(ValueError, RuntimeError):
    """A state dict does not fit the model (missing or unexpected keys, other shapes). A
    ``RuntimeError`` as ``torch.nn.Module.load_state_dict``'s (and HF PEFT's) is, and a
    ``ValueError`` like the kernel's other bad-input errors."""


class UnsupportedOptionError(ValueError, RuntimeError):
    """An option names a choice that does not exist (e.g. an unknown ``majority_sign_method``);
    a ``ValueError``, and the ``RuntimeError`` HF PEFT raises for it."""
