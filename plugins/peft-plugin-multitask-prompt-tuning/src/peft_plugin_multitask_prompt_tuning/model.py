"""``MultitaskPromptEmbedding``: the prompt encoder of multitask prompt tuning.

A shared table ``P`` (``total × token_dim``, prompt tuning's ``PromptEmbedding``) and, per task
``k``, factors ``C_k`` (``total × r``) and ``R_k`` (``r × token_dim``). Row ``b`` of a batch with
task ``k = task_ids[b]`` gets the virtual tokens

    P ⊙ (C_k · R_k)            (element-wise product)

Checkpoint keys (HF PEFT's): ``prompt_embeddings`` = ``P``, ``prefix_task_cols`` = all ``C``
(``num_tasks × total × r``), ``prefix_task_rows`` = all ``R`` (``num_tasks × r × token_dim``).

A new adapter may start from a source-task checkpoint (``prompt_tuning_init``): its ``P``, and
its ``C``/``R`` averaged over the source tasks or taken from one of them. The file is read with
safetensors, or with ``torch.load(weights_only=True)``; nothing in it is executed.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_plugin_prompt_tuning.model import PromptEmbedding

from .config import FROM_SOURCE, MultitaskPromptTuningInit


class MultitaskPromptEmbedding(PromptEmbedding):
    """``forward(indices, task_ids)`` gives ``(batch, len(indices), token_dim)``."""

    checkpoint_keys = {"prompt_embeddings": "embedding.weight", "prefix_task_cols": "prefix_task_cols",
                       "prefix_task_rows": "prefix_task_rows"}

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__(config, word_embeddings)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        init = config.prompt_tuning_init
        if init in FROM_SOURCE and not config.inference_mode and self.embedding.weight.device.type != "meta":
            self._init_from_source(config, init, word_embeddings)

    def _init_from_source(self, config, init, word_embeddings: nn.Module) -> None:
        source = load_source(config.prompt_tuning_init_state_dict_path, word_embeddings.weight.device)
        missing = [k for k in self.checkpoint_keys if k not in source]
        if init == MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
            missing = [k for k in missing if k == "prompt_embeddings"]
        if missing:
            raise ValueError(f"source checkpoint {config.prompt_tuning_init_state_dict_path!r} lacks {missing}")
        values = {"embedding.weight": source["prompt_embeddings"]}
        if init == MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS:
            values["prefix_task_cols"] = source["prefix_task_cols"].mean(0, keepdim=True)
            values["prefix_task_rows"] = source["prefix_task_rows"].mean(0, keepdim=True)
        elif init == MultitaskPromptTuningInit.EXACT_SOURCE_TASK:
            task = config.prompt_tuning_init_task
            tasks = source["prefix_task_cols"].shape[0]
            if not 0 <= task < tasks:
                raise ValueError(f"prompt_tuning_init_task={task} is not a task of the source checkpoint "
                                 f"(it has {tasks})")
            values["prefix_task_cols"] = source["prefix_task_cols"][task : task + 1]
            values["prefix_task_rows"] = source["prefix_task_rows"][task : task + 1]
        own = dict(self.named_parameters())
        wrong = [f"{name}: source {tuple(v.shape)} vs {tuple(own[name].shape)}" for name, v in values.items()
                 if v.shape != own[name].shape]
        if wrong:
            raise ValueError(f"source checkpoint does not fit this adapter ({'; '.join(wrong)}); source tasks are "
                             "averaged or picked into a single-task adapter (num_tasks=1) of the same size")
        with torch.no_grad():
            for name, value in values.items():
                own[name].copy_(value)

    def forward(self, indices: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            if self.prefix_task_cols.shape[0] != 1:
                raise ValueError("multitask prompt tuning needs task_ids (one task index per row) in forward and "
                                 "generate")
            task_ids = torch.zeros(indices.shape[0], dtype=torch.long, device=indices.device)  # the only task
        scale = torch.matmul(self.prefix_task_cols[task_ids], self.prefix_task_rows[task_ids])
        return self.embedding(indices) * scale


def load_source(path: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a source-task checkpoint: safetensors, or a weights-only torch file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(device))
    return torch.load(path, map_location=device, weights_only=True)
