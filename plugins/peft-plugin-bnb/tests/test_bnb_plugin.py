"""Plugin-level tests that need no quantization library (the kernel's
:class:`~peft_kernel.testing.quant.QuantPluginContract`). They run in every environment."""

from peft_kernel.testing.quant import QuantPluginContract


class TestBnbPlugin(QuantPluginContract):
    plugin = "peft_plugin_bnb"
    distribution = "peft-plugin-bnb"
    backend_names = ["bnb-8bit", "bnb-4bit"]
    libraries = ("bitsandbytes",)
    missing_reason = "bitsandbytes is not installed"
