"""Writing files so that a crash or a full disk never leaves a good file truncated."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """The file holds either its old content or the new, never a truncated mix: a full disk fails
    the write of the temporary beside it, and the rename that replaces the old file is atomic."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
