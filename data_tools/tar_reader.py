"""A small reader of uncompressed tar streams, shared by ``mdt-data verify`` / ``inspect`` and the
trainer's loader.

It replaces ``tarfile``: header parsing dominated loader time, and shards are plain ustar. PAX
``path``/``size`` records and GNU long names are honoured; damage raises ValueError (bad header
checksum) or EOFError (truncation, missing end marker).
"""

from __future__ import annotations

from typing import IO, Callable, Iterator

from .format import split_member_name

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes of the stream, or EOFError."""
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"tar data truncated ({len(data)} of {size} bytes)")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a PAX extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return records


def iter_tar_files(stream: IO[bytes], want: Callable[[str], bool] | None = None
                   ) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(name, data)`` for every regular file of a tar stream (``data`` None when
    ``want(name)`` is false: skipped without copying).

    Damage raises ValueError (bad header checksum) or EOFError (truncation, missing end marker).
    """
    long_name, pax_size = None, None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise EOFError("tar stream ends without an end-of-archive block")
        if header == _ZERO_BLOCK:
            return
        expected = _tar_number(header[148:156])
        unsigned = sum(header[:148]) + sum(header[156:]) + 8 * 32
        if expected != unsigned and expected != unsigned - 256 * sum(b >= 128 for b in header):
            raise ValueError("tar header checksum mismatch")
        size = pax_size if pax_size is not None else _tar_number(header[124:136])
        kind = header[156:157]
        padded = size + (-size % _BLOCK)
        if kind in (b"x", b"g", b"L", b"K"):
            data = _read_exact(stream, padded)[:size]
            if kind == b"x":
                pax = _pax_records(data)
                long_name = pax.get("path", long_name)
                pax_size = int(pax["size"]) if "size" in pax else None
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8")
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8") + "/" + name
        long_name, pax_size = None, None
        if kind in _FILE_TYPES and (want is None or want(name)):
            data = _read_exact(stream, padded)[:size] if padded != size else _read_exact(stream, size)
            yield name, data
        else:
            if padded:
                _read_exact(stream, padded)
            if kind in _FILE_TYPES:
                yield name, None


def iter_tar_samples(stream: IO[bytes], fields: frozenset[str] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {field: bytes})`` from a tar stream, in stream order.

    Only members whose field is in ``fields`` are read (``None``: all). Damaged tar data
    raises (ValueError, EOFError, OSError); the caller decides whether that is fatal.
    """
    key, group = None, {}
    want = None if fields is None else (lambda name: split_member_name(name)[1] in fields)
    for name, data in iter_tar_files(stream, want):
        member_key, field_name = split_member_name(name)
        if member_key != key:
            if key is not None:
                yield key, group
            key, group = member_key, {}
        if data is not None:
            group[field_name] = data
    if key is not None:
        yield key, group
