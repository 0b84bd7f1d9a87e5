"""The ``peft-kernel`` command line from a plugin's tests, run in the test's process (the
command line's ``main``, as the console script calls it; no interpreter start-up per call).

    losses = finetune("mymethod", tmp_path / "adapter", "--r", "4", "--steps", "16")
    assert losses[-1] < losses[0]
    assert listed_plugins()["mymethod"]["methods"] == ["MYMETHOD"]
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


def run(*args) -> str:
    """``peft-kernel <args>``; its stdout. A non-zero exit fails with stderr."""
    from peft_kernel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
    assert code in (0, None), err.getvalue()
    return out.getvalue()


def finetune(method: str, output: Path, *args) -> list[float]:
    """``peft-kernel finetune --method <method> --output <output> <args>`` on the built-in model
    and data; the logged losses. Checks the adapter was saved with the method's ``peft_type``."""
    run("finetune", "--method", method, "--output", output, *args)
    assert json.loads((Path(output) / "adapter_config.json").read_text())["peft_type"] == method.upper()
    state = json.loads((Path(output) / "trainer_state.json").read_text())
    return [loss for _, loss in state["loss_history"]]


def listed_plugins() -> dict[str, dict]:
    """``peft-kernel plugins --json`` by plugin name."""
    return {row["name"]: row for row in json.loads(run("plugins", "--json"))}


class FinetuneSuite:
    """A method plugin's command-line checks; subclass it with a ``Test`` name and set ``method``
    (the plugin's entry-point name, whose upper case is its ``peft_type``) and ``distribution``:
    ``peft-kernel finetune`` trains 16 steps (lr 0.02) on the built-in model and data with ``finetune_args``
    and the loss falls by more than ``min_drop``; ``peft-kernel plugins`` lists the plugin, loaded."""

    method: str = ""
    distribution: str = ""
    finetune_args: tuple[str, ...] = ("--r", "4")
    min_drop: float = 0.3

    def test_finetune_trains(self, tmp_path):
        import pytest

        pytest.importorskip("transformers")
        pytest.importorskip("accelerate")
        losses = finetune(self.method, tmp_path / "adapter", "--steps", "16", "--batch-size", "4", "--seq-len", "32",
                          "--log-every", "8", "--lr", "0.02", *self.finetune_args)
        assert len(losses) == 2 and losses[-1] < losses[0] - self.min_drop, losses

    def test_listed_by_peft_kernel_plugins(self):
        row = listed_plugins()[self.method]
        assert (row["distribution"], row["methods"], row["error"]) == (self.distribution, [self.method.upper()], None)
