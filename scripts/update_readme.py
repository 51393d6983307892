"""Regenerate README.md's launch-config reference from the config dataclasses' docstrings.

    python scripts/update_readme.py    # a test fails when README.md is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import reference_markdown  # noqa: E402

START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def render(text: str) -> str:
    """README text with the reference block replaced by the current one."""
    block = f"{START}\n{reference_markdown().rstrip()}\n{END}"
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render(readme.read_text()))
    print(f"updated {readme}")
