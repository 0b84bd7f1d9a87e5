"""``peft-kernel finetune --method miss`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestMissCommandLine(FinetuneSuite):
    method, distribution = "miss", "peft-plugin-miss"
