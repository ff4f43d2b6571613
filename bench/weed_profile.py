"""Where a SeaweedFS server spends its CPU: a summary of ``weed -cpuprofile`` output.

``weed`` writes a Go pprof CPU profile (gzipped ``profile.proto``) when started with
``-cpuprofile=FILE`` and stopped with SIGTERM. Reading one normally needs Go's ``pprof`` tool,
which this project does not install; this module decodes the few fields it needs (samples,
locations, functions, string table) from the protobuf wire format and groups the CPU time by
what the S3 write path does with every byte: a sample counts for the first of
:data:`CATEGORIES` that any frame of its stack matches, else for "other".

    .venv/bin/python bench/weed_profile.py weed.prof            # categories + top functions
    .venv/bin/python bench/bench_storage.py --profile DIR ...   # profiles every --config
"""

from __future__ import annotations

import argparse
import collections
import gzip
import sys
from collections.abc import Iterator
from pathlib import Path

#: (category, function-name prefixes); a sample goes to the first category any frame matches.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("MD5 (S3 ETag, chunker, chunk Content-MD5, volume check)", ("crypto/md5.",)),
    ("SHA-256 (x-amz-checksum-sha256 check)", ("crypto/internal/fips140/sha256", "crypto/sha256")),
    ("CRC32C (needle checksum)", ("hash/crc32.",)),
    ("garbage collector", ("runtime.gcBgMarkWorker", "runtime.gcDrain", "runtime.bgsweep",
                           "runtime.gcAssist")),
    ("pwrite to volume files", ("syscall.pwrite", "syscall.Pwrite")),
    ("socket reads (client -> S3, S3 -> volume)", ("syscall.read", "syscall.Read")),
    ("socket writes (S3 -> volume, replies)", ("syscall.write", "syscall.Write")),
    ("multipart form parsing (volume server)", ("mime/multipart.",)),
    ("buffer growth and copies", ("bytes.growSlice", "runtime.memmove",
                                  "runtime.memclrNoHeapPointers")),
    ("gRPC and protobuf (assign, filer)", ("google.golang.org/grpc", "google.golang.org/protobuf")),
)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield number, value
        elif wire == 2:
            size, i = _varint(buf, i)
            yield number, buf[i:i + size]
            i += size
        elif wire == 1:
            yield number, buf[i:i + 8]
            i += 8
        elif wire == 5:
            yield number, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _ints(value: int | bytes) -> list[int]:
    """A repeated int field, packed or not."""
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def read_profile(path: Path) -> list[tuple[list[str], int]]:
    """Samples of a pprof CPU profile: (function names leaf first, CPU nanoseconds)."""
    raw = path.read_bytes()
    buf = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    strings: list[str] = []
    samples: list[tuple[list[int], list[int]]] = []
    locations: dict[int, list[int]] = {}
    functions: dict[int, int] = {}
    for number, value in _fields(buf):
        if not isinstance(value, bytes):
            continue
        if number == 6:  # string_table
            strings.append(value.decode("utf-8", "replace"))
        elif number == 2:  # Sample: location_id (1), value (2)
            ids: list[int] = []
            values: list[int] = []
            for n, v in _fields(value):
                if n == 1:
                    ids += _ints(v)
                elif n == 2:
                    values += _ints(v)
            samples.append((ids, values))
        elif number == 4:  # Location: id (1), line (4) -> function_id (1)
            loc_id, funcs = 0, []
            for n, v in _fields(value):
                if n == 1 and isinstance(v, int):
                    loc_id = v
                elif n == 4 and isinstance(v, bytes):
                    funcs += [int(f) for m, f in _fields(v) if m == 1 and isinstance(f, int)]
            locations[loc_id] = funcs
        elif number == 5:  # Function: id (1), name (2, string index)
            fid = name = 0
            for n, v in _fields(value):
                if n == 1 and isinstance(v, int):
                    fid = v
                elif n == 2 and isinstance(v, int):
                    name = v
            functions[fid] = name
    return [([strings[functions[f]] for loc in ids for f in locations.get(loc, [])],
             values[-1] if values else 0) for ids, values in samples]


def summarize(samples: list[tuple[list[str], int]]) -> tuple[float, dict[str, float],
                                                              dict[str, float]]:
    """Total CPU seconds, seconds per category (plus "other"), seconds per leaf function."""
    by_category: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for names, ns in samples:
        total += ns
        if names:
            by_leaf[names[0]] += ns
        for category, prefixes in CATEGORIES:
            if any(name.startswith(prefixes) for name in names):
                by_category[category] += ns
                break
        else:
            by_category["other"] += ns
    return (total / 1e9, {k: v / 1e9 for k, v in by_category.most_common()},
            {k: v / 1e9 for k, v in by_leaf.most_common()})


def format_summary(path: Path, top: int = 8) -> str:
    total, categories, leaves = summarize(read_profile(path))
    if total <= 0:
        return f"{path}: no CPU samples"
    lines = [f"{path.name}: {total:.2f} CPU s sampled"]
    lines += [f"  {seconds / total:6.1%}  {name}" for name, seconds in categories.items()]
    lines.append("  top functions (own time):")
    lines += [f"  {seconds / total:6.1%}  {name}" for name, seconds in list(leaves.items())[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profiles", nargs="+", type=Path, help="weed -cpuprofile output files")
    ap.add_argument("--top", type=int, default=8, help="functions listed by own time")
    args = ap.parse_args(argv)
    for path in args.profiles:
        print(format_summary(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
