"""Multitask prompt tuning specifics: task_ids, config validation, source checkpoints (weights
only), loading without the source, training per task."""

from __future__ import annotations

import pytest
import torch

import peft_kernel
from peft_kernel import PeftModel, get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_plugin_multitask_prompt_tuning import (
    MultitaskPromptEmbedding,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
)

pytest.importorskip("transformers")


def config(**kw):
    return MultitaskPromptTuningConfig(**{"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "num_tasks": 2,
                                          "num_ranks": 2, **kw})


def test_registered_and_validated():
    spec = peft_kernel.plugins.manager().method("MULTITASK_PROMPT_TUNING")
    assert spec.config_cls is MultitaskPromptTuningConfig and spec.model_cls is MultitaskPromptEmbedding
    assert config(prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path="x.safetensors") \
        .prompt_tuning_init is MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS
    with pytest.raises(ValueError, match="prompt_tuning_init_state_dict_path"):
        config(prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ValueError, match="SAMPLE_VOCAB"):
        config(prompt_tuning_init="SAMPLE_VOCAB")
    with pytest.raises(ValueError, match="num_ranks"):
        config(num_ranks=0)


def test_each_row_gets_its_task_and_task_ids_are_required():
    model = get_peft_model(M.llama(), config())
    encoder = model.prompt_encoder["default"]
    prompts = model.get_prompt(2, task_ids=torch.tensor([1, 0]))
    table = encoder.embedding.weight
    for row, task in enumerate((1, 0)):
        expected = table * (encoder.prefix_task_cols[task] @ encoder.prefix_task_rows[task])
        torch.testing.assert_close(prompts[row], expected)
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=M.ids())
    single = get_peft_model(M.llama(), config(num_tasks=1))  # one task: task_ids may be left out
    with torch.no_grad():
        torch.testing.assert_close(single(input_ids=M.ids()).logits,
                                   single(input_ids=M.ids(), task_ids=torch.tensor([0, 0])).logits)


def test_source_checkpoints_are_read_weights_only(tmp_path):
    source = get_peft_model(M.llama(), config(num_tasks=3))
    state = peft_kernel.get_peft_model_state_dict(source)
    torch.save({**state, "note": _NotATensor()}, tmp_path / "unsafe.bin")
    with pytest.raises(Exception, match="[Ww]eights only"):
        get_peft_model(M.llama(), config(num_tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                         prompt_tuning_init_state_dict_path=str(tmp_path / "unsafe.bin")))
    torch.save(state, tmp_path / "source.bin")
    with pytest.raises(ValueError, match="prompt_tuning_init_task=5"):
        get_peft_model(M.llama(), config(num_tasks=1, prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=5,
                                         prompt_tuning_init_state_dict_path=str(tmp_path / "source.bin")))
    with pytest.raises(ValueError, match="does not fit"):
        get_peft_model(M.llama(), config(num_tasks=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                         prompt_tuning_init_state_dict_path=str(tmp_path / "source.bin")))


class _NotATensor:
    pass


def test_loading_needs_no_source_checkpoint(tmp_path):
    source = get_peft_model(M.llama(), config(num_tasks=3))
    from safetensors.torch import save_file

    save_file(peft_kernel.get_peft_model_state_dict(source), tmp_path / "source.safetensors")
    model = get_peft_model(M.llama(), config(num_tasks=1, prompt_tuning_init="AVERAGE_SOURCE_TASKS",
                                             prompt_tuning_init_state_dict_path=str(tmp_path / "source.safetensors")))
    torch.testing.assert_close(model.prompt_encoder["default"].prefix_task_rows,
                               source.prompt_encoder["default"].prefix_task_rows.mean(0, keepdim=True))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "source.safetensors").unlink()
    loaded = PeftModel.from_pretrained(M.llama(), tmp_path / "adapter")
    x, tasks = M.ids(), torch.tensor([0, 0])
    with torch.no_grad():
        expected = model(input_ids=x, task_ids=tasks).logits
        torch.testing.assert_close(loaded(input_ids=x, task_ids=tasks).logits, expected)
