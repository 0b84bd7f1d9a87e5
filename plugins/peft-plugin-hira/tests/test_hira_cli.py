"""``peft-kernel finetune --method hira`` trains (the loss falls), and the plugin is listed."""

from peft_kernel.testing.cli import FinetuneSuite


class TestHiraCommandLine(FinetuneSuite):
    method, distribution = "hira", "peft-plugin-hira"
    finetune_args = ("--r", "4", "--lr", "0.1")  # ΔW = W₀ ⊙ BA is small where W₀ is: a larger step
