"""``peft-kernel finetune --method oft`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestOftCommandLine(FinetuneSuite):
    method, distribution = "oft", "peft-plugin-oft"
    finetune_args = ("--option", "oft_block_size=8")
