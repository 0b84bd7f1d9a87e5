"""``peft-kernel finetune --method boft`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestBoftCommandLine(FinetuneSuite):
    method, distribution = "boft", "peft-plugin-boft"
    finetune_args = ("--option", "boft_block_size=8")
