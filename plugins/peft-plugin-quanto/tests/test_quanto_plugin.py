"""Plugin-level tests that need no quantization library (the kernel's
:class:`~peft_kernel.testing.quant.QuantPluginContract`). They run in every environment."""

from peft_kernel.testing.quant import QuantPluginContract


class TestQuantoPlugin(QuantPluginContract):
    plugin = "peft_plugin_quanto"
    distribution = "peft-plugin-quanto"
    backend_names = ["quanto"]
    libraries = ("optimum.quanto",)  # not all of optimum: only its quanto part is the library
    missing_reason = "optimum-quanto is not installed"
