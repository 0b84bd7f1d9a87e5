"""``peft-kernel finetune --method loha`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestLoHaCommandLine(FinetuneSuite):
    method, distribution = "loha", "peft-plugin-loha"
