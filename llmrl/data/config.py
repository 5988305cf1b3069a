"""The recipe's `data` section: where tasks come from and how they become prompts."""
from __future__ import annotations

from pydantic import Field, field_validator

from llmrl.config_base import Section


class DataConfigError(ValueError):
    """A data setting or a dataset that cannot be used; the message names the recipe key."""


class DataConfig(Section):
    type: str = Field(
        "arithmetic",
        description=(
            "Built-in task type: `arithmetic` (generated, no download), `gsm8k`, `math`, "
            "`multihop` (generated knowledge-base questions for search agents, no download), `qa` "
            "(question + golden_answers rows for search agents), or `generic` (any dataset, columns "
            "chosen with `fields`). It decides how the gold answer is read, the default "
            "instruction, and the default reward."
        ),
    )
    path: str | None = Field(
        None,
        description=(
            "Where rows come from: a .jsonl/.json/.parquet file, a directory (holding "
            "`<split>.jsonl` directly or under a per-type folder such as `gsm8k/` or `math500/`), "
            "or a hub dataset id like `openai/gsm8k`. Ignored by `arithmetic` and `multihop`."
        ),
    )
    eval_path: str | None = Field(
        None,
        description=(
            "Source of the held-out split, when it is not in `path` (for example a second "
            "file). Defaults to `path`."
        ),
    )
    subset: str | None = Field(
        None,
        description=(
            "Hub dataset configuration name (the second argument of `datasets.load_dataset`), "
            "e.g. `main` for openai/gsm8k. Only used for hub ids."
        ),
    )
    split: str = Field("train", description="Split used for training prompts.")
    eval_split: str = Field("test", description="Held-out split used for evaluation.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Maps task keys to dataset columns, merged over the type's defaults. Keys: `prompt` "
            "(the problem), `answer` (gold), `id` (stable task id); any other key (e.g. "
            "`oracle_solution`, `expert_response`, `solution`, `subject`, `level`) is copied "
            "into Task.meta. A column named here that is missing from a row makes the row "
            "malformed."
        ),
    )
    instruction: str | None = Field(
        None,
        description=(
            "Text added to every problem. With a `{problem}` placeholder it is a template "
            "around the problem; otherwise it is appended after a blank line. Unset: the "
            "type's default; empty string: no instruction."
        ),
    )
    system_prompt: str | None = Field(
        None,
        description=(
            "System message put before the user turn. Unset: none is added (the tokenizer's "
            "chat template may still insert its own default)."
        ),
    )
    chat_template: bool = Field(
        True,
        description=(
            "Render prompts with the tokenizer's chat template. false: plain text for base models, the "
            "system prompt and the problem (through `instruction`, e.g. 'Question: {problem}\\nAnswer:') "
            "separated by blank lines. Held-out evaluation during training follows it unless "
            "eval.chat_template is set; `llmrl eval --model RUN_DIR` follows the run's recipe."
        ),
    )
    max_prompt_tokens: int = Field(
        512,
        ge=1,
        description="Rows whose templated prompt is longer than this many tokens are skipped.",
    )
    max_bad_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Largest share of malformed rows (missing column, empty prompt, no gold answer, "
            "too long, duplicate id) that is skipped quietly; above it loading fails and names "
            "the first bad row."
        ),
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N rows of each split (quick runs, smoke tests)."
    )
    shuffle: bool = Field(
        True, description="Draw training prompts in a fresh seeded order every epoch."
    )
    num_train: int = Field(2000, ge=1, description="arithmetic: number of training problems.")
    num_test: int = Field(
        200, ge=1, description="arithmetic: number of held-out problems (disjoint from train)."
    )
    difficulty: int = Field(
        1,
        ge=1,
        le=8,
        description=(
            "arithmetic: 1 = two operands of 1-2 digits with + or - (never negative); each step "
            "adds one operand, every second step adds a digit, and from 3 on `*` by a "
            "one-digit factor appears."
        ),
    )
    data_seed: int = Field(
        1234, description="Seed for generated problems and for the order prompts are drawn in."
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        # Imported here: the registry module imports this one for DataConfig.
        from llmrl.data.builtin import task_type_names

        names = task_type_names()
        if value not in names:
            raise ValueError(f"unknown task type {value!r}; choose one of {', '.join(names)}")
        return value
