"""Conformance kit for method plugins (see :mod:`peft_kernel.testing.conformance`)."""
