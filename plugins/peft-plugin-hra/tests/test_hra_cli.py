"""``peft-kernel finetune --method hra`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestHraCommandLine(FinetuneSuite):
    method, distribution = "hra", "peft-plugin-hra"
