"""torchao through transformers, as a user does it: ``from_pretrained`` with a
``TorchAoConfig`` (torchao 0.18 config objects), ``prepare_model_for_kbit_training``, LoRA on
all linear layers, a few training steps, save, reload, merge.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

tq = pytest.importorskip("torchao.quantization")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft_plugin_lora")

from peft_plugin_lora.testing import run_transformers_flow  # noqa: E402

warnings.filterwarnings("ignore", module="torchao")

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_int8_weight_only(tmp_path):
    # measured: merged_err 0.0028 (logits up to ~0.48, adapter effect ~0.66); reload_err 0.0
    r = run_transformers_flow(tmp_path, lambda: transformers.TorchAoConfig(tq.Int8WeightOnlyConfig()),
                              backend="torchao", merged_tol=0.01)
    assert r.reload_err == 0.0
