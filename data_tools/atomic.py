"""Atomic file writes, shared by the data tools (journal records, manifest) and the trainer
(checkpoint records, ``latest``, reports).

Standard library only, so that any layer may import it without pulling in numpy or webdataset.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` so readers see either the old file or the complete new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as sorted JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
