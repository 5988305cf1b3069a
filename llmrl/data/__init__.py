"""Tasks for the RL loop: built-in task types, dataset loading, chat prompts, prompt sampling."""
from llmrl.data.builtin import (
    RowError,
    TaskSet,
    TaskType,
    build_tasks,
    get_task_type,
    last_boxed,
    register_task_type,
    task_type_names,
)
from llmrl.data.config import DataConfig, DataConfigError
from llmrl.data.prompts import build_messages, tokenize_prompt
from llmrl.data.sampler import PromptSampler
from llmrl.data.sources import load_rows

__all__ = [
    "DataConfig",
    "DataConfigError",
    "PromptSampler",
    "RowError",
    "TaskSet",
    "TaskType",
    "build_messages",
    "build_tasks",
    "get_task_type",
    "last_boxed",
    "load_rows",
    "register_task_type",
    "task_type_names",
    "tokenize_prompt",
]
