"""Warning category shared by the kernel and its plugins."""


class PeftWarning(UserWarning):
    """Something about an adapter that the user should know but that is not an error."""
