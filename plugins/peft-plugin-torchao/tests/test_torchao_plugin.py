"""Plugin-level tests that need no quantization library (the kernel's
:class:`~peft_kernel.testing.quant.QuantPluginContract`). They run in every environment."""

from peft_kernel.testing.quant import QuantPluginContract


class TestTorchaoPlugin(QuantPluginContract):
    plugin = "peft_plugin_torchao"
    distribution = "peft-plugin-torchao"
    backend_names = ["torchao"]
    libraries = ("torchao",)
    missing_reason = "torchao is not installed"
