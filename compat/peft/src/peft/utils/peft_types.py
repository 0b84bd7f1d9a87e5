"""``peft.utils.peft_types``: method ids and task types."""

from peft_kernel import PeftType, TaskType

__all__ = ["PeftType", "TaskType"]
