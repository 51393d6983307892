"""The launch config: the schema (`schema`), YAML + overrides (`parsing`), checks (`validation`), the
DeepSpeed JSON (`deepspeed_json`), the phase plan it implies (`phases`), the run's training FLOPs
(`flops`, shared by the run's accounting and study budgets) and its reference (`reference`).
Imports nothing of the runtime: a bad config fails in a second, before any process group or data
loader exists."""

from .deepspeed_json import PRECISIONS, to_deepspeed_json, zero_section
from .flops import TrainingFlops, align_head_flops_per_token
from .parsing import config_from_dict, load_config
from .phases import PhasePlan, PhaseState
from .reference import reference_markdown
from .schema import (
    AlignConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DeepSpeedSection,
    DiffusionConfig,
    EMAConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    PhasesConfig,
    RunConfig,
    TrainConfig,
)
from .validation import validate

__all__ = [
    "PRECISIONS", "to_deepspeed_json", "zero_section", "TrainingFlops", "align_head_flops_per_token",
    "config_from_dict", "load_config", "PhasePlan", "PhaseState",
    "reference_markdown", "AlignConfig",
    "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedSection", "DiffusionConfig",
    "EMAConfig", "EvalConfig", "ModelConfig", "MonitorConfig", "OptimConfig", "PhasesConfig", "RunConfig",
    "TrainConfig", "validate",
]
