"""What every command of the CLI shares: one-line usage errors, the launcher's rank argument, the
options that read a published release."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line naming the culprit (exit 2), no usage block."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def from_launcher(args: argparse.Namespace) -> None:
    """The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK itself."""
    if getattr(args, "local_rank", None) is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))


def release_options(p: argparse.ArgumentParser) -> None:
    """The options that read a published release with a non-standard layout."""
    p.add_argument("--layout", choices=("dit", "sit", "maskdit"), default=None,
                   help="a release's layout (default: from its keys; a DiT-layout file named *sit* is SiT's)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of a release with a non-standard width (the weights do not say)")
    p.add_argument("--decoder-num-heads", type=int, default=None,
                   help="decoder heads of a MaskDiT release with a non-standard decoder width")
