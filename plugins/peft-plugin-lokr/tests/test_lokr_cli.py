"""``peft-kernel finetune --method lokr`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestLoKrCommandLine(FinetuneSuite):
    method, distribution = "lokr", "peft-plugin-lokr"
