"""Base class for every recipe section: unknown keys are errors, assignments are validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. Every field must carry a `description`: it is the key's documentation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
