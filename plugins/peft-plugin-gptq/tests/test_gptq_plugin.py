"""Plugin-level tests that need no quantization library (the kernel's
:class:`~peft_kernel.testing.quant.QuantPluginContract`). They run in every environment."""

from peft_kernel.testing.quant import QuantPluginContract


class TestGptqPlugin(QuantPluginContract):
    plugin = "peft_plugin_gptq"
    distribution = "peft-plugin-gptq"
    backend_names = ["gptq"]
    libraries = ("gptqmodel", "auto_gptq")
    missing_reason = "gptqmodel is not installed"
