"""Plugin-level tests that need no quantization library (the kernel's
:class:`~peft_kernel.testing.quant.QuantPluginContract`). They run in every environment."""

from peft_kernel.testing.quant import QuantPluginContract


class TestHqqPlugin(QuantPluginContract):
    plugin = "peft_plugin_hqq"
    distribution = "peft-plugin-hqq"
    backend_names = ["hqq"]
    libraries = ("hqq",)
    missing_reason = "hqq is not installed"
