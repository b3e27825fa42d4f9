"""ClickHouse's native compressed-block framing, as its HTTP interface speaks it with `compress=1` / `decompress=1`.

Each block: a 16-byte CityHash128 (v1.0.2) checksum of the rest, one method byte (0x82 LZ4, 0x90 ZSTD,
0x02 none), the compressed size including the 9-byte header and the uncompressed size (both UInt32
little-endian), then the data. ClickHouse writes LZ4 blocks of at most 1 MiB uncompressed.
"""

from __future__ import annotations

import struct

import lz4.block
from clickhouse_cityhash.cityhash import CityHash128

try:
    from compression import zstd as _zstd  # Python 3.14+
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd
    except ImportError:
        _zstd = None
_ERRORS = (lz4.block.LZ4BlockError, ValueError) + ((_zstd.ZstdError,) if _zstd else ())

LZ4, ZSTD, NONE = 0x82, 0x90, 0x02
BLOCK_SIZE = 1 << 20  # ClickHouse's DBMS_DEFAULT_BUFFER_SIZE
_HEADER = struct.Struct("<BII")
_MASK = (1 << 64) - 1
# ClickHouse's max_decompressed_size guard: a header may not announce more than this.
MAX_BLOCK = 1 << 30


class BlockError(ValueError):
    """A compressed body that is not valid ClickHouse block framing (bad checksum, method or size)."""


def _checksum(block: bytes) -> bytes:
    value = CityHash128(block)  # ClickHouse writes low64 then high64; this int holds low64 in its high half
    return struct.pack("<QQ", value >> 64, value & _MASK)


def compress(data: bytes, method: int = LZ4) -> bytes:
    """`data` as a sequence of checksummed blocks; empty data gives an empty body, as ClickHouse sends."""
    out = []
    for start in range(0, len(data), BLOCK_SIZE):
        chunk = data[start:start + BLOCK_SIZE]
        if method == LZ4:
            packed = lz4.block.compress(chunk, store_size=False)
        elif method == ZSTD and _zstd:
            packed = _zstd.compress(chunk)
        elif method == NONE:
            packed = chunk
        else:
            raise ValueError(f"unsupported block method 0x{method:02x}")
        block = _HEADER.pack(method, _HEADER.size + len(packed), len(chunk)) + packed
        out.append(_checksum(block) + block)
    return b"".join(out)


def decompress(body: bytes) -> bytes:
    """Every block of `body`, checked against its checksum, or BlockError naming what is wrong."""
    out = []
    position = 0
    while position < len(body):
        if len(body) - position < 16 + _HEADER.size:
            raise BlockError(f"truncated block header at byte {position}")
        method, size, plain_size = _HEADER.unpack_from(body, position + 16)
        if size < _HEADER.size or plain_size > MAX_BLOCK:
            raise BlockError(f"impossible block sizes at byte {position}: compressed {size}, uncompressed {plain_size}")
        block = body[position + 16:position + 16 + size]
        if len(block) < size:
            raise BlockError(f"truncated block at byte {position}: {len(block)} of {size} bytes")
        if _checksum(block) != body[position:position + 16]:
            raise BlockError(f"checksum doesn't match: corrupted data (block at byte {position})")
        packed = block[_HEADER.size:]
        try:
            if method == LZ4:
                plain = lz4.block.decompress(packed, uncompressed_size=plain_size)
            elif method == ZSTD and _zstd:
                plain = _zstd.decompress(packed)
            elif method == NONE:
                plain = packed
            else:
                raise BlockError(f"unknown compression method 0x{method:02x} (supported: 0x82 LZ4, "
                                 f"{'0x90 ZSTD, ' if _zstd else ''}0x02 none)")
        except _ERRORS as exc:
            if isinstance(exc, BlockError):
                raise
            raise BlockError(f"cannot decompress block at byte {position}: {exc}") from None
        if len(plain) != plain_size:
            raise BlockError(f"block at byte {position} holds {len(plain)} bytes, its header says {plain_size}")
        out.append(plain)
        position += 16 + size
    return b"".join(out)
