"""Warning category shared by the kernel and its plugins."""


class PeftWarning(UserWarning):
    """Something about an adapter that the user should know but that is not an error."""


class NoMatchingPeftModuleError(ValueError):
    """No module of the model matched an adapter's targets (HF PEFT's name for it)."""


class MergeNotSupportedError(ValueError, NotImplementedError):
    """An adapter cannot be folded into this base layer; raised before anything changes.

    It is both a ``ValueError`` and a ``NotImplementedError`` so code written against
    either convention catches it.
    """


class ConfigTypeError(TypeError, ValueError):
    """A config field holds a value of the wrong type; raised when the config is built.

    It is both a ``TypeError`` (what it is) and a ``ValueError`` (what bad config values
    raise otherwise), so code written against either convention catches it.
    """
