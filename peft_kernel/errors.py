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
