"""Checkpoints as files: the typed record (`record`), the directory layout and which checkpoint
counts (`layout`), network weights and exports (`weights`), and the universal layout for another
number of ranks (`universal`), and the one reader of every weights file (`readers`: ours and the
published releases). Shared by the training run (which saves and resumes through
trainer.training.checkpointer), `mdt-export`, `mdt-universal` and sampling; imports nothing of the
training run."""

from .layout import (
    COMPLETE,
    EMA_FILE,
    LATEST,
    PARTIAL_SUFFIX,
    UNIVERSAL_SUFFIX,
    complete_tags,
    find_resume,
    is_complete,
    is_partitioned,
    is_universal,
    make_tag,
    resolve_checkpoint,
    rotate,
)
from .readers import NetworkSource, read_network
from .record import (
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointError,
    CheckpointNotFound,
    CheckpointRecord,
    RunState,
    read_record,
    write_record,
)
from .universal import for_world_size, to_universal
from .weights import NET_PREFIX, WEIGHT_KINDS, export_weights, network_weights, read_exported, write_export

__all__ = [
    "COMPLETE", "EMA_FILE", "LATEST", "PARTIAL_SUFFIX", "UNIVERSAL_SUFFIX", "complete_tags", "find_resume",
    "is_complete", "is_partitioned", "is_universal", "make_tag", "resolve_checkpoint", "rotate", "FORMAT_VERSION",
    "STATE_FILE", "CheckpointError", "CheckpointNotFound", "CheckpointRecord", "RunState", "read_record",
    "write_record",
    "for_world_size", "to_universal", "NET_PREFIX", "WEIGHT_KINDS", "export_weights", "network_weights",
    "read_exported", "NetworkSource", "read_network", "write_export",
]
