"""The encoder's journal: which shards of a part are complete, and the writer that records them.

Part ``p`` writes shards ``{prefix}-p{p:04d}-{k:06d}.tar``. Each is written to ``NAME.tmp``,
renamed when complete and then recorded in ``_journal/NAME.json`` (count, bytes, sha256, source
index range, settings fingerprint). A shard without a matching record does not exist as far as a
rerun is concerned: it keeps the longest verified prefix of recorded shards and deletes the rest.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from webdataset import ShardWriter

from .atomic import write_json_atomic
from .format import TAR_WRITER_OPTIONS
from .manifest import sha256_file

JOURNAL_DIR = "_journal"


def part_range(total: int, part: int, num_parts: int) -> tuple[int, int]:
    """Contiguous [lo, hi) slice of the source owned by ``part``."""
    return total * part // num_parts, total * (part + 1) // num_parts


def shard_name(prefix: str, part: int, index: int) -> str:
    """File name of shard ``index`` of ``part`` (unique per writer)."""
    return f"{prefix}-p{part:04d}-{index:06d}.tar"


def _record_path(out: str, name: str) -> str:
    """Where the journal record of shard ``name`` lives."""
    return os.path.join(out, JOURNAL_DIR, name[: -len(".tar")] + ".json")


def _read_record(path: str) -> dict | None:
    """A journal record, or None when it is missing or unreadable (a crash mid-write)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def valid_records(out: str, prefix: str, part: int, *, fingerprint: str, lo: int,
                  rehash: bool = True) -> list[dict]:
    """Records of the longest valid prefix of this part's shards (read-only).

    A shard counts when its record has our fingerprint, continues the previous index range
    (starting at ``lo``), and the file has the recorded size (and hash, with ``rehash``).
    """
    records: list[dict] = []
    expect = lo
    while True:
        name = shard_name(prefix, part, len(records))
        rec = _read_record(_record_path(out, name))
        path = os.path.join(out, name)
        if not (rec and rec.get("fingerprint") == fingerprint and rec.get("first_index") == expect
                and os.path.isfile(path) and os.path.getsize(path) == rec.get("bytes")):
            break
        if rehash and sha256_file(path) != rec.get("sha256"):
            break
        records.append(rec)
        expect = rec["end_index"]
    return records


def recover_part(out: str, prefix: str, part: int, *, fingerprint: str, lo: int) -> list[dict]:
    """Keep this part's verified shard prefix and delete everything after it, including any
    ``.tmp`` left by a crash, so a partial shard can never be listed. Only the owner of the
    part may call this."""
    records = valid_records(out, prefix, part, fingerprint=fingerprint, lo=lo, rehash=True)
    pattern = re.compile(rf"^{re.escape(prefix)}-p{part:04d}-(\d+)\.(tar|tar\.tmp|json)$")
    for folder in (out, os.path.join(out, JOURNAL_DIR)):
        for entry in os.listdir(folder) if os.path.isdir(folder) else []:
            match = pattern.match(entry)
            if match and (int(match.group(1)) >= len(records) or match.group(2) == "tar.tmp"):
                os.remove(os.path.join(folder, entry))
    return records


class PartWriter:
    """Wraps ShardWriter: shards go to NAME.tmp, then rename, hash and journal record."""

    def __init__(self, out: str, prefix: str, part: int, *, start_shard: int, first_index: int,
                 max_count: int, max_bytes: float, meta: dict[str, Any]):
        """Continue part ``part`` at shard ``start_shard``, whose first sample is source image
        ``first_index``; ``meta`` goes into every journal record."""
        self.out, self.meta, self.first, self.end = out, meta, first_index, first_index
        self.count, self.handle = 0, None
        pattern = os.path.join(out, f"{prefix}-p{part:04d}-%06d.tar")
        self.writer = ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes,
                                  post=self._post, start_shard=start_shard, verbose=0,
                                  opener=self._open, **TAR_WRITER_OPTIONS)

    def _open(self, fname: str):
        """ShardWriter's opener: the shard is written under a temporary name."""
        self.handle = open(fname + ".tmp", "wb")
        return self.handle

    def _post(self, fname: str) -> None:
        """ShardWriter's hook after a shard is complete: sync, rename, then record it."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(fname + ".tmp", fname)
        name = os.path.basename(fname)
        record = dict(self.meta, name=name, samples=self.count, bytes=os.path.getsize(fname),
                      sha256=sha256_file(fname), first_index=self.first, end_index=self.end)
        write_json_atomic(_record_path(self.out, name), record)
        self.first, self.count = self.end, 0

    def write(self, index: int, sample: dict) -> None:
        """Write one sample; a shard closed by this call ends just before ``index``."""
        self.end = index
        self.writer.write(sample)
        self.count += 1

    def close(self, end_index: int) -> None:
        """Close the last shard, which covers the source up to ``end_index``."""
        self.end = end_index
        self.writer.close()

    def abort(self) -> None:
        """Drop the shard being written (after an error): never renamed, never recorded."""
        if self.handle is not None and not self.handle.closed:
            self.writer.tarstream.close()  # ends the tar stream so nothing writes to it later
            self.handle.close()
            os.remove(self.handle.name)
