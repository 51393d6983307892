"""The metric registry: every metric the project measures, once. A `MetricSpec` gives its name, the
`eval.metrics` group that turns it on in training, which way is better, how it prints, and the
function `mdt-eval` computes it with on image sets (None where it needs a model: val_loss).

Read by the config's validation (the eval.metrics groups), the training run's evaluator (names,
NAME@gSCALE, its `eval step` line), `mdt-eval` (`metrics.py`: what it computes and prints),
`mdt-eval --history` (`history.py`) and the study (the headline metric's direction and group,
the post-hoc tables). The standard library only at module level, so that `trainer.config` may read
it without importing the runtime (import-linter contracts `config` and `metric-registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Tuple

if TYPE_CHECKING:
    from .image_sets import ImageSets

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name and everything that differs from one metric to the next."""

    name: str
    group: str
    """The eval.metrics entry that turns it on in the training run (val_loss, digits, fid, mnist)."""
    better: str
    """LOWER or HIGHER: which way the metric gets better."""
    function: Callable[[ImageSets], float] | None
    """mdt-eval's computation on image sets; None for a metric that needs a model (val_loss)."""
    fmt: str = "{:.4f}"
    """How mdt-eval prints a value (`name: value`)."""
    line_fmt: str = "{:.4g}"
    """How the training run's `eval step ...` line prints a value."""
    table_fmt: str = "{:.4g}"
    """How tables print a value: `mdt-eval --history`, the study's post-hoc tables."""


# Each function imports its computation (torch, the networks) only when mdt-eval calls it: the
# registry stays light enough for the launch config to read.
def _fid(sets: ImageSets) -> float:
    from .image_sets import fid_metric  # noqa: PLC0415 - heavy (torch, Inception); only when computed

    return fid_metric(sets)


def _digits_fd(sets: ImageSets) -> float:
    from .image_sets import digits_fd_metric  # noqa: PLC0415 - heavy (torch, the digits classifier)

    return digits_fd_metric(sets)


def _digits_acc(sets: ImageSets) -> float:
    from .image_sets import digits_acc_metric  # noqa: PLC0415 - heavy (torch, the digits classifier)

    return digits_acc_metric(sets)


def _mnist_fd(sets: ImageSets) -> float:
    from .image_sets import mnist_fd_metric  # noqa: PLC0415 - heavy (torch, the MNIST classifier)

    return mnist_fd_metric(sets)


def _mnist_acc(sets: ImageSets) -> float:
    from .image_sets import mnist_acc_metric  # noqa: PLC0415 - heavy (torch, the MNIST classifier)

    return mnist_acc_metric(sets)


# The order is the one every listing shows (study quality names; eval.metrics groups by first use).
METRIC_SPECS: Dict[str, MetricSpec] = {spec.name: spec for spec in (
    MetricSpec("val_loss", group="val_loss", better=LOWER, function=None),
    MetricSpec("digits_fd", group="digits", better=LOWER, function=_digits_fd),
    MetricSpec("fid", group="fid", better=LOWER, function=_fid),
    MetricSpec("digits_acc", group="digits", better=HIGHER, function=_digits_acc, fmt="{:.2%}", line_fmt="{:.2%}",
               table_fmt="{:.1%}"),
    MetricSpec("mnist_fd", group="mnist", better=LOWER, function=_mnist_fd),
    MetricSpec("mnist_acc", group="mnist", better=HIGHER, function=_mnist_acc, fmt="{:.2%}", line_fmt="{:.2%}",
               table_fmt="{:.1%}"),
)}
"""Every metric by name. A metric's name in a record may carry a guidance scale (digits_fd@g2) or
a noise level (val_loss/sigma=0.3); its stem (`metric_stem`) is the registry name."""

EVAL_GROUPS: Tuple[str, ...] = tuple(dict.fromkeys(spec.group for spec in METRIC_SPECS.values()))
"""The eval.metrics entries, each turning on its group of metrics in the training run."""


def metric_stem(name: str) -> str:
    """The registry name inside a metric name: digits_fd@g2 -> digits_fd, val_loss/sigma=0.3 -> val_loss."""
    return name.split("@", 1)[0].split("/", 1)[0]


def guided(name: str, scale: float) -> str:
    """A metric's name at a guidance scale: NAME at 1, NAME@gSCALE otherwise."""
    return name if scale == 1 else f"{name}@g{scale:g}"


def direction(name: str) -> str:
    """LOWER or HIGHER: which way a metric gets better; ValueError for a metric outside the registry."""
    spec = METRIC_SPECS.get(metric_stem(name))
    if spec is None:
        raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRIC_SPECS)} "
                         f"(with an optional @gSCALE suffix)")
    return spec.better


def in_groups(groups: Iterable[str]) -> List[MetricSpec]:
    """The metrics the eval.metrics entries `groups` turn on, group by group in EVAL_GROUPS order."""
    chosen = set(groups)
    return [spec for group in EVAL_GROUPS if group in chosen for spec in METRIC_SPECS.values() if spec.group == group]


def _fmt(name: str, attr: str) -> str:
    spec = METRIC_SPECS.get(metric_stem(name))
    return getattr(spec, attr) if spec is not None else "{:.4g}"  # a name outside the registry: plainly


def line_text(name: str, value: float) -> str:
    """A value as the training run's `eval step` line prints it (by the name's stem)."""
    return _fmt(name, "line_fmt").format(value)


def table_text(name: str, value: float) -> str:
    """A value as tables print it (by the name's stem): `mdt-eval --history`, the study's tables."""
    return _fmt(name, "table_fmt").format(value)
