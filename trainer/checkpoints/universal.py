"""Resuming on another number of ranks: DeepSpeed's universal checkpoint layout.

A ZeRO-1/2/3 checkpoint's optimizer state is split per rank, so it loads only on the world size
that wrote it. `to_universal` (`mdt-universal`) converts one into DeepSpeed's universal layout
(zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt) next to it as <tag>_universal, with our own files;
`for_world_size` picks that copy when a rerun has another world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil

from data_tools.atomic import write_text_atomic

from .layout import COMPLETE, EMA_FILE, PARTIAL_SUFFIX, UNIVERSAL_SUFFIX, complete_tags, is_partitioned, is_universal
from .record import CheckpointError, CheckpointRecord, read_record, write_record


def for_world_size(path: str, world_size: int) -> str:
    """The directory to load on world_size ranks: path itself, or its universal copy
    (path + '_universal', made by `to_universal`) when the world size changed and path's
    optimizer state is partitioned. Raises CheckpointError naming the command that fixes it,
    also when the copy was made from an earlier checkpoint of the same tag (a run resumed from an
    older checkpoint rewrote the tag)."""
    record = read_record(path)
    saved = record.world_size
    if saved == world_size or is_universal(path) or not is_partitioned(path):
        return path
    universal = os.path.normpath(path) + UNIVERSAL_SUFFIX
    if os.path.exists(os.path.join(universal, COMPLETE)) and is_universal(universal):
        if not _same_state(record, universal):
            raise CheckpointError(f"{universal} is stale (made from an earlier {path}): remove it and rerun "
                                  f"mdt-universal {path}")
        return universal
    raise CheckpointError(f"checkpoint {path} was written by a world of {saved} with ZeRO-partitioned optimizer "
                          f"state, this run has {world_size}: run `mdt-universal {path}` once, then rerun "
                          "(README: Resume)")


def _same_state(record: CheckpointRecord, universal: str) -> bool:
    """Whether the universal copy was made from the checkpoint with this record: the same step and
    replica checksums (the copy's own `universal_from` does not count)."""
    try:
        copy = read_record(universal)
    except CheckpointError:
        return False
    return (copy.step, copy.replica_checksums) == (record.step, record.replica_checksums)


def to_universal(checkpoint: str, out: str | None = None, workers: int = 1) -> str:
    """Convert a complete ZeRO-1/2/3 checkpoint into a universal one that resumes on any number of
    ranks; returns its directory (default: checkpoint + '_universal', where the training command
    looks for it when the world size changed).

    DeepSpeed's ds_to_universal does the conversion (with inject_missing_state: our engine does not
    tag its checkpoints for it); our own files (trainer state, EMA, data positions) are copied and
    COMPLETE is written last. The result is built under OUT.partial and renamed when done; on any
    failure OUT.partial is removed and a CheckpointError says what went wrong.
    """
    checkpoint = os.path.normpath(checkpoint)
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    if not os.path.exists(os.path.join(checkpoint, COMPLETE)):
        tags = complete_tags(checkpoint)
        hint = f": it holds checkpoints, pass one, e.g. {os.path.join(checkpoint, tags[-1])}" if tags else ""
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE} file){hint}")
    record = read_record(checkpoint)
    if is_universal(checkpoint):
        raise CheckpointError(f"{checkpoint} is already a universal checkpoint")
    if not is_partitioned(checkpoint):
        raise CheckpointError(f"{checkpoint} has no ZeRO-partitioned optimizer state (ZeRO stage 0): it resumes on "
                              "any number of ranks as it is, no conversion needed")
    out = os.path.normpath(out) if out else checkpoint + UNIVERSAL_SUFFIX
    if os.path.exists(out):
        raise CheckpointError(f"{out} already exists: remove it or choose another --out")
    partial = out + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    # DeepSpeed points a `latest_universal` file next to its output at it (at OUT.partial, renamed
    # below): our tags are explicit, so whatever that file held before (or its absence) is put back.
    latest = os.path.join(os.path.dirname(partial), "latest_universal")
    try:
        with open(latest) as f:
            old_latest: str | None = f.read()
    except FileNotFoundError:
        old_latest = None
    except OSError as err:
        raise CheckpointError(f"cannot read {latest} (DeepSpeed's conversion would overwrite it): {err}") from err
    # DeepSpeed only here: the rest of trainer.checkpoints (and sampling) works without importing it
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415

    args = argparse.Namespace(input_folder=checkpoint, output_folder=partial, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    try:
        try:
            ds_to_universal.main(args)
        except Exception as err:  # noqa: BLE001 - reported as one line, the partial output removed
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(f"DeepSpeed could not convert {checkpoint}: {type(err).__name__}: {detail}") from err
        try:
            for name in sorted(os.listdir(checkpoint)):
                if name == EMA_FILE or re.fullmatch(r"data_rank\d+\.json", name):
                    shutil.copy2(os.path.join(checkpoint, name), os.path.join(partial, name))
            write_record(partial, dataclasses.replace(record, universal_from=checkpoint))
            write_text_atomic(os.path.join(partial, COMPLETE), "")
            os.replace(partial, out)
        except OSError as err:
            raise CheckpointError(f"could not write {out} (from {checkpoint}): {err}") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written left behind
        raise
    finally:
        _restore(latest, old_latest)
    return out


def _restore(path: str, text: str | None) -> None:
    """Put a small file back as it was: holding `text`, or absent for None (best effort)."""
    try:
        if text is not None:
            write_text_atomic(path, text)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass
