"""optimum-quanto through transformers, as a user does it: ``from_pretrained`` with a
``QuantoConfig``, ``prepare_model_for_kbit_training``, LoRA on all linear layers, a few
training steps, save, reload, merge.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("optimum.quanto")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft_plugin_lora")

from peft_plugin_lora.testing import run_transformers_flow  # noqa: E402

warnings.filterwarnings("ignore", module="optimum")

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_int8_weights(tmp_path):
    # measured: merged_err 0.0039 (logits up to ~0.48, adapter effect ~0.65); reload_err 0.0
    r = run_transformers_flow(tmp_path, lambda: transformers.QuantoConfig(weights="int8"),
                              backend="quanto", merged_tol=0.01)
    assert r.reload_err == 0.0
