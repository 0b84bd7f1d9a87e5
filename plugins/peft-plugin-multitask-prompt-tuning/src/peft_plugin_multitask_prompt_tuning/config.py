"""``MultitaskPromptTuningConfig``: HF PEFT's fields and defaults, so configs load both ways."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft_plugin_prompt_tuning.config import PromptTuningConfig


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the shared prompt and the task matrices start out."""

    TEXT = "TEXT"  #: shared prompt from the embeddings of ``prompt_tuning_init_text`` (prompt tuning's TEXT)
    RANDOM = "RANDOM"  #: shared prompt standard normal, task matrices N(0, 0.02²)
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"  #: source prompt, task matrices averaged over the source tasks
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"  #: source prompt, task matrices of source task prompt_tuning_init_task
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"  #: source prompt only, task matrices random

    def __str__(self) -> str:
        return self.value


#: inits that read the source checkpoint at prompt_tuning_init_state_dict_path
FROM_SOURCE = (MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS, MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
               MultitaskPromptTuningInit.ONLY_SOURCE_SHARED)


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt scaled, per task, by a rank-``num_ranks``
    matrix; ``task_ids`` pick each row's task."""

    prompt_tuning_init: MultitaskPromptTuningInit | str = field(
        default=MultitaskPromptTuningInit.RANDOM,
        metadata={"help": "TEXT, RANDOM, AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED."},
    )
    prompt_tuning_init_state_dict_path: str | None = field(
        default=None, metadata={"help": "Source checkpoint (.safetensors, or a weights-only torch file) to start from."}
    )
    prompt_tuning_init_task: int | None = field(default=0, metadata={"help": "Source task for EXACT_SOURCE_TASK."})
    num_ranks: int | None = field(default=1, metadata={"help": "Rank of each task's scaling matrix."})
    num_tasks: int | None = field(default=1, metadata={"help": "Number of tasks."})

    init_choices = MultitaskPromptTuningInit

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "MULTITASK_PROMPT_TUNING"
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_tuning_init in FROM_SOURCE and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init.value} needs "
                             "prompt_tuning_init_state_dict_path (the source-task checkpoint)")
