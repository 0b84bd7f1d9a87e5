"""``peft-kernel finetune --method road`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestRoadCommandLine(FinetuneSuite):
    method, distribution = "road", "peft-plugin-road"
    finetune_args = ("--target-modules", "all-linear", "--option", 'variant="road_4"', "--lr", "0.1")
