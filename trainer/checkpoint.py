"""Checkpoints: save on all ranks, mark complete last, resume from the latest complete one, rotate,
and export weights to one safetensors file usable without DeepSpeed.

Layout of run_dir/checkpoints/:

    <tag>/                  DeepSpeed's files (model / optimizer shards of every rank)
    <tag>/ema.safetensors   the float32 EMA weights (rank 0)
    <tag>/trainer_state.json step, images seen, phase, counters, config, EMA update count
    <tag>/data_rank<r>.json each rank's data stream position
    <tag>/COMPLETE          written after every rank finished; only then is the tag eligible
    latest                  name of the newest complete tag (replaced atomically)
    <tag>_universal/        optional: `to_universal(<tag>)`, the same state in DeepSpeed's universal
                            layout (zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt) plus our files;
                            loads on any number of ranks. Not a tag: auto-resume picks it only in
                            place of <tag> when the world size changed (and only while its trainer
                            state is <tag>'s), rotation and a rewrite of <tag> remove it.

Nothing here pickles code: DeepSpeed's own files hold tensors and plain containers, ours are JSON
and safetensors.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"
_UNIVERSAL_STATE = os.path.join("zero", "optimizer_state.pt")
_TAG = re.compile(r"^step(\d{8,})(?:-([a-z_]+))?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the one-line message says why and what to do."""


def make_tag(step: int, phase_end: Optional[str] = None) -> str:
    """Checkpoint tag for the state after `step` optimizer steps; phase-end saves carry the phase."""
    return f"step{step:08d}" + (f"-{phase_end}" if phase_end else "")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under root, oldest first (by step)."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and os.path.exists(os.path.join(root, t, COMPLETE))]
    return sorted(tags, key=lambda t: (int(_TAG.match(t).group(1)), t))


def find_resume(root: str, resume: str) -> Optional[str]:
    """The checkpoint directory to resume from: 'auto' (newest complete), 'none', or a path."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, COMPLETE)):
            raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE} file)")
        return resume
    latest = os.path.join(root, LATEST)
    if os.path.exists(latest):
        tag = open(latest).read().strip()
        if os.path.exists(os.path.join(root, tag, COMPLETE)):
            return os.path.join(root, tag)
    tags = complete_tags(root)  # `latest` missing or stale: fall back to the newest complete tag
    return os.path.join(root, tags[-1]) if tags else None


def save(engine, ema, root: str, tag: str, state: Dict[str, Any], data_state: Dict[str, Any], rank: int,
         barrier) -> str:
    """Save a checkpoint; must be called on every rank. Returns the checkpoint directory."""
    from safetensors.torch import save_file

    path = os.path.join(root, tag)
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path)  # a leftover of the same tag: a partial save, or a run resumed from an older one
        for stale in (path + UNIVERSAL_SUFFIX, path + UNIVERSAL_SUFFIX + PARTIAL_SUFFIX):
            shutil.rmtree(stale, ignore_errors=True)  # made from the old <tag>, no longer its state
    barrier()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    os.makedirs(path, exist_ok=True)
    _write_atomic(os.path.join(path, f"data_rank{rank}.json"), json.dumps(data_state))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(path, EMA_FILE))
        _write_atomic(os.path.join(path, STATE_FILE), json.dumps(state, indent=1, default=str))
    barrier()
    if rank == 0:
        _write_atomic(os.path.join(path, COMPLETE), "")
        _write_atomic(os.path.join(root, LATEST), tag)
    barrier()
    return path


def rotate(root: str, keep_last: int, keep_phase_ends: bool) -> List[str]:
    """Delete old complete periodic checkpoints beyond the newest keep_last; returns deleted tags.

    Incomplete tag directories older than the newest complete one are partial saves: removed too.
    A deleted tag's universal copy goes with it, and so do half-written universal copies
    (<tag>_universal.partial, left by an interrupted `mdt-universal`) of tags that are gone.
    """
    tags = complete_tags(root)
    periodic = [t for t in tags if not (keep_phase_ends and _TAG.match(t).group(2))]
    doomed = periodic[:-keep_last] if keep_last else periodic
    if tags:
        newest = int(_TAG.match(tags[-1]).group(1))
        for t in os.listdir(root):
            m = _TAG.match(t)
            if m and t not in tags and int(m.group(1)) < newest:
                doomed.append(t)
    for t in doomed:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
        shutil.rmtree(os.path.join(root, t + UNIVERSAL_SUFFIX), ignore_errors=True)
        shutil.rmtree(os.path.join(root, t + UNIVERSAL_SUFFIX + PARTIAL_SUFFIX), ignore_errors=True)
    suffix = UNIVERSAL_SUFFIX + PARTIAL_SUFFIX
    for name in os.listdir(root):  # orphans: their tag was deleted before
        if name.endswith(suffix) and _TAG.match(name[:-len(suffix)]) and \
                not os.path.exists(os.path.join(root, name[:-len(suffix)])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return doomed


def load(engine, ema, path: str, rank: int) -> Dict[str, Any]:
    """Restore engine (model + optimizer), EMA, and return the trainer state plus this rank's data state."""
    from safetensors.torch import load_file

    root, tag = os.path.split(os.path.normpath(path))
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    ema.load_state_dict(load_file(os.path.join(path, EMA_FILE)), updates=int(state.get("ema_updates", 0)))
    data_file = os.path.join(path, f"data_rank{rank}.json")
    state["data"] = json.load(open(data_file)) if os.path.exists(data_file) else None
    return state


def optimizer_state_summary(optimizer) -> str:
    """What the optimizer holds, for the resume line: 'Adam step N' (the largest step count in its
    state) or 'fresh' (no state yet). Follows `.optimizer` from DeepSpeed's wrapper (ZeRO 1-3, the
    bf16 optimizer) to the innermost torch optimizer; ZeRO-0 without one is that optimizer."""
    inner, opt, seen = None, optimizer, set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            inner = opt
        opt = getattr(opt, "optimizer", None)
    if inner is None or not inner.state:
        return "fresh"
    steps = [s["step"] for s in inner.state.values() if isinstance(s, dict) and "step" in s]
    steps += [g["step"] for g in inner.param_groups if "step" in g]  # optimizers that count per group
    if not steps:
        return "loaded (no step count)"
    return f"Adam step {max(int(float(s)) for s in steps)}"


# ----------------------------------------------------------------------------- world-size changes


def read_state(path: str) -> Dict[str, Any]:
    """The trainer state (trainer_state.json) of a checkpoint directory."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (no {STATE_FILE})")
    with open(state_file) as f:
        return json.load(f)


def is_universal(path: str) -> bool:
    """True for a checkpoint in DeepSpeed's universal layout (loads on any number of ranks)."""
    return os.path.isfile(os.path.join(path, _UNIVERSAL_STATE))


def is_partitioned(path: str) -> bool:
    """True when DeepSpeed split the optimizer state per rank (ZeRO-1/2/3): such a checkpoint loads
    only on the world size that wrote it. ZeRO-0 keeps it whole and loads on any world size."""
    return bool(glob.glob(os.path.join(path, "*_optim_states.pt")))


def for_world_size(path: str, world_size: int) -> str:
    """The directory to load on world_size ranks: path itself, or its universal copy
    (path + '_universal', made by `to_universal`) when the world size changed and path's
    optimizer state is partitioned. Raises CheckpointError naming the command that fixes it,
    also when the copy was made from an earlier checkpoint of the same tag (a run resumed from an
    older checkpoint rewrote the tag)."""
    state = read_state(path)
    saved = int(state["world_size"])
    if saved == world_size or is_universal(path) or not is_partitioned(path):
        return path
    universal = os.path.normpath(path) + UNIVERSAL_SUFFIX
    if os.path.exists(os.path.join(universal, COMPLETE)) and is_universal(universal):
        if not _same_state(state, universal):
            raise CheckpointError(f"{universal} is stale (made from an earlier {path}): remove it and rerun "
                                  f"mdt-universal {path}")
        return universal
    raise CheckpointError(f"checkpoint {path} was written by a world of {saved} with ZeRO-partitioned optimizer "
                          f"state, this run has {world_size}: run `mdt-universal {path}` once, then rerun "
                          "(README: Resume)")


def _same_state(state: Dict[str, Any], universal: str) -> bool:
    """Whether the universal copy was made from the checkpoint whose trainer state is `state`:
    the same step and replica checksums (the copy's own `universal_from` does not count)."""
    try:
        copy = read_state(universal)
    except (CheckpointError, ValueError, OSError):
        return False
    return all(copy.get(k) == state.get(k) for k in ("step", "replica_checksums"))


def to_universal(checkpoint: str, out: Optional[str] = None, workers: int = 1) -> str:
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
    state = read_state(checkpoint)
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
            old_latest: Optional[str] = f.read()
    except FileNotFoundError:
        old_latest = None
    except OSError as err:
        raise CheckpointError(f"cannot read {latest} (DeepSpeed's conversion would overwrite it): {err}") from err
    from deepspeed.checkpoint import ds_to_universal

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
            state["universal_from"] = checkpoint
            _write_atomic(os.path.join(partial, STATE_FILE), json.dumps(state, indent=1, default=str))
            _write_atomic(os.path.join(partial, COMPLETE), "")
            os.replace(partial, out)
        except OSError as err:
            raise CheckpointError(f"could not write {out} (from {checkpoint}): {err}") from err
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written left behind
        raise
    finally:
        _restore(latest, old_latest)
    return out


def _restore(path: str, text: Optional[str]) -> None:
    """Put a small file back as it was: holding `text`, or absent for None (best effort)."""
    try:
        if text is not None:
            _write_atomic(path, text)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def data_states(path: str, world_size: int) -> List[Dict[str, Any]]:
    """The data stream positions saved by each of world_size ranks."""
    out = []
    for r in range(world_size):
        with open(os.path.join(path, f"data_rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def rescale_data_state(saved: List[Dict[str, Any]], saved_micro_batch: int, rank: int, world_size: int,
                       micro_batch: int, steps_per_epoch: int) -> Dict[str, Any]:
    """Data stream position for `rank` of `world_size` ranks from the positions saved by
    len(saved) ranks (each with micro batches of saved_micro_batch samples).

    A rank's stream depends on its rank and the world size, so saved positions do not carry over.
    The new stream starts in the saved epoch after the same number of that epoch's samples (over all
    ranks), rounded down to whole micro batches of the new world: deterministic for the new world
    size. The rest of that epoch is drawn afresh (a sample of it may repeat or be left out); later
    epochs are whole. skipped: each rank keeps its own count (0 for new ranks).
    """
    epoch, done = int(saved[0]["epoch"]), int(saved[0]["batches_in_epoch"])  # the same on every rank
    batches = done * len(saved) * saved_micro_batch // (world_size * micro_batch)
    if batches >= steps_per_epoch:
        epoch, batches = epoch + 1, 0
    return dict(samples_seen=sum(int(s["samples_seen"]) for s in saved) // world_size, epoch=epoch,
                batches_in_epoch=batches, skipped=int(saved[rank].get("skipped", 0)) if rank < len(saved) else 0)


def resume_data_state(saved: Dict[str, Any], path: str, rank: int, world_size: int, micro_batch: int,
                      steps_per_epoch: int) -> Tuple[Optional[Dict[str, Any]], bool]:
    """(this rank's data stream position, whether it was rescaled) for resuming from checkpoint
    `path`, whose state `load` returned as `saved`.

    The saved position counts micro batches of the saved world: it is used as it is only when
    (world size, micro batch size) is the saved pair, else `rescale_data_state` converts it. A
    state without the micro batch size counts as written with this run's.
    """
    saved_world = int(saved["world_size"])
    saved_micro = ((saved.get("config") or {}).get("data") or {}).get("micro_batch_size")
    saved_micro = micro_batch if saved_micro is None else int(saved_micro)
    if (saved_world, saved_micro) == (world_size, micro_batch):
        return saved.get("data"), False
    return rescale_data_state(data_states(path, saved_world), saved_micro, rank, world_size, micro_batch,
                              steps_per_epoch), True


def _universal_weights(checkpoint: str) -> Dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint: zero/<name>/fp32.pt (tensors only, no code)."""
    root = os.path.join(checkpoint, "zero")
    out = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "fp32.pt")
        if os.path.isfile(path):
            out[name] = torch.load(path, map_location="cpu", weights_only=True)["param"]
    return out


def checkpoint_weights(checkpoint: str, which: str = "ema") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(network state dict in float32, trainer state) of a complete checkpoint.

    which='ema': the saved average; 'model': the live weights consolidated from the ZeRO shards
    through DeepSpeed's API (works for every stage, no process group needed), or read from a
    universal checkpoint's zero/ folder.
    """
    from safetensors.torch import load_file

    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        state = json.load(f)
    if which == "ema":
        return load_file(os.path.join(checkpoint, EMA_FILE)), state
    if which != "model":
        raise ValueError(f"weights must be 'ema' or 'model', got {which!r}")
    if is_universal(checkpoint):
        full = _universal_weights(checkpoint)
    elif not is_partitioned(checkpoint):
        # ZeRO-0 keeps the whole module in the model-states file (DeepSpeed's consolidation expects
        # partitioned optimizer files and fails on it); tensors only, no code.
        full = torch.load(os.path.join(checkpoint, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=True)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = os.path.split(os.path.normpath(checkpoint))
        full = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    prefix = "denoiser.net."
    return {k[len(prefix):]: v.detach().float().contiguous() for k, v in full.items() if k.startswith(prefix)}, state


def export_weights(checkpoint: str, out_path: str, which: str = "ema") -> Dict[str, str]:
    """Write one safetensors file of network weights (EMA or live model) with metadata to rebuild it.

    The live weights come through DeepSpeed's consolidation API, so ZeRO-1/2/3 checkpoints work
    without a process group. Metadata: model name and constructor kwargs (JSON), step, which.
    """
    from safetensors.torch import save_file

    weights, state = checkpoint_weights(checkpoint, which)
    meta = {"model": state["model_name"], "model_kwargs": json.dumps(state["model_kwargs"]),
            "step": str(state["step"]), "weights": which,
            "diffusion": json.dumps(state["config"]["diffusion"]), "dataset": json.dumps(state.get("dataset", {}))}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(weights, out_path, metadata=meta)
    return meta


def load_exported(path: str, device: str | torch.device = "cpu"):
    """Rebuild the network from an exported safetensors file (no DeepSpeed needed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model_zoo.registry import build_model

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    net = build_model(meta["model"], **json.loads(meta["model_kwargs"]))
    net.load_state_dict(load_file(path, device=str(device)))
    return net.to(device).eval(), meta
