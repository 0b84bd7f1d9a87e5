"""``peft-kernel finetune --method adaption_prompt`` trains (the loss falls), its checkpoint
loads in HF PEFT with the same logits, and ``peft-kernel merge`` refuses it in one line."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.filterwarnings("ignore")


def cli(*args) -> tuple[int, str]:
    """``peft-kernel ...`` in this process (a fresh interpreter would double the cost);
    returns the exit status and stderr."""
    from peft_kernel.cli import main

    threads, showwarning, err = torch.get_num_threads(), warnings.showwarning, io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:  # what the command sets for the process: one thread for its tiny model, one-line warnings
        torch.set_num_threads(threads)
        warnings.showwarning = showwarning
    return code, err.getvalue()


def test_finetune_trains_and_the_checkpoint_is_hf_peft_s(tmp_path):
    out = tmp_path / "adapter"
    code, err = cli("finetune", "--method", "adaption_prompt", "--option", "adapter_len=8",
                    "--option", "adapter_layers=2", "--steps", "30", "--log-every", "10", "--batch-size", "8",
                    "--seq-len", "32", "--lr", "0.05", "--output", out)
    assert code == 0, err
    losses = [loss for _, loss in json.loads((out / "trainer_state.json").read_text())["loss_history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["target_modules"], config["adapter_len"]) == ("ADAPTION_PROMPT", "self_attn", 8)

    peft = pytest.importorskip("peft")
    from peft_kernel import PeftModel
    from peft_kernel.cli._models import build_default_model

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = PeftModel.from_pretrained(build_default_model(), out)(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(build_default_model(), out)(input_ids=ids).logits
        base = build_default_model()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-2, "the trained adapter changes nothing"

    code, err = cli("merge", "default", out, "--output", tmp_path / "merged")
    assert code == 2 and err.startswith("peft-kernel merge: error: ADAPTION_PROMPT adapters cannot be merged here"), err
    assert not (tmp_path / "merged").exists()
