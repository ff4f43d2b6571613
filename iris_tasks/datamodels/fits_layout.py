"""The block layout of a FITS file, read from its headers alone.

A FITS file is a sequence of HDUs, each a header of 2880-byte blocks of 80-character cards
ending with ``END``, followed by its data padded to a whole block. The size of the data
follows from a few cards (``BITPIX``, ``NAXISn``, ``PCOUNT``, ``GCOUNT``; FITS standard 4.0,
section 4.4.1), so whether a file is complete -- every HDU present with all of its data -- can
be told by reading one header after another and seeking over the data, without parsing the
file with astropy and without reading the data. The landing area uses this to tell a file that
is still being written from one that is whole; it never raises on damaged input, it says what
is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BLOCK = 2880
CARD = 80
# Bytes of header read before giving up on finding END: far above any IRIS header (a few
# hundred cards) and a guard against walking a huge non-FITS file block by block.
MAX_HEADER_BYTES = 1000 * BLOCK


@dataclass(frozen=True)
class HduSpan:
    """One HDU's place in the file."""

    index: int
    name: str  # EXTNAME, or PRIMARY for the first HDU
    header_offset: int
    data_offset: int
    data_size: int  # without the padding to a whole block
    bitpix: int
    shape: tuple[int, ...]  # NAXIS1..NAXISn as written (FITS order)

    @property
    def end(self) -> int:
        """Offset just past the padded data."""
        return self.data_offset + -(-self.data_size // BLOCK) * BLOCK


@dataclass(frozen=True)
class FitsLayout:
    """The HDUs found and, when the file is not a whole FITS file, why."""

    size: int
    hdus: tuple[HduSpan, ...]
    problem: str | None  # None: every HDU is complete and the file ends after the last one
    trailing: int = 0  # bytes after the last HDU that start no extension (ignored)

    @property
    def complete(self) -> bool:
        return self.problem is None

    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hdus)


def _card_value(card: str) -> str:
    """The value text of a ``KEY = value / comment`` card (strings keep their quotes off)."""
    text = card[10:] if card[8:10] == "= " else ""
    text = text.strip()
    if text.startswith("'"):
        end = text.find("'", 1)
        while end != -1 and text[end + 1:end + 2] == "'":  # '' is an escaped quote
            end = text.find("'", end + 2)
        return text[1:end].rstrip() if end != -1 else text[1:]
    return text.split("/", 1)[0].strip()


def _read_header(f, offset: int, size: int) -> tuple[dict[str, str], int] | str:
    """Cards of the header at ``offset`` and its length, or the problem found."""
    cards: dict[str, str] = {}
    pos = offset
    while pos - offset < MAX_HEADER_BYTES:
        if pos + BLOCK > size:
            return f"header at byte {offset} is cut off at byte {size} (no END card yet)"
        f.seek(pos)
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            return f"header at byte {offset} is cut off at byte {pos + len(block)}"
        try:
            text = block.decode("ascii")
        except UnicodeDecodeError:
            return f"header at byte {offset} holds non-ASCII bytes (not a FITS header)"
        pos += BLOCK
        for i in range(0, BLOCK, CARD):
            card = text[i:i + CARD]
            key = card[:8].rstrip()
            if key == "END":
                return cards, pos - offset
            if key and key not in cards:
                cards[key] = _card_value(card)
    return f"no END card in the first {MAX_HEADER_BYTES} bytes of the header at byte {offset}"


def _int(cards: dict[str, str], key: str, default: int | None = None) -> int:
    if key not in cards:
        if default is None:
            raise ValueError(f"missing {key}")
        return default
    try:
        return int(cards[key])
    except ValueError:
        raise ValueError(f"{key} = {cards[key]!r} is not an integer") from None


def read_layout(path: str | os.PathLike[str]) -> FitsLayout:
    """Walk the HDUs of ``path``; never raises for damaged content (only for an unreadable
    path: ``OSError``)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        hdus: list[HduSpan] = []
        if size == 0:
            return FitsLayout(0, (), "the file is empty")
        f.seek(0)
        if not f.read(CARD).startswith(b"SIMPLE  ="):
            return FitsLayout(size, (), "not a FITS file (it does not start with SIMPLE =)")
        offset = 0
        while offset < size:
            if hdus:
                f.seek(offset)
                peek = f.read(8)
                if not (peek.startswith(b"XTENSION") or b"XTENSION".startswith(peek)):
                    # Bytes after the last HDU that do not start an extension: FITS allows
                    # such trailing records (standard 4.0, 3.5), astropy ignores them, and a
                    # writer still appending would be writing an XTENSION header here.
                    return FitsLayout(size, tuple(hdus), None, trailing=size - offset)
            got = _read_header(f, offset, size)
            if isinstance(got, str):
                return FitsLayout(size, tuple(hdus), got)
            cards, header_len = got
            try:
                bitpix = _int(cards, "BITPIX")
                naxis = _int(cards, "NAXIS")
                shape = tuple(_int(cards, f"NAXIS{i}") for i in range(1, naxis + 1))
                pcount, gcount = _int(cards, "PCOUNT", 0), _int(cards, "GCOUNT", 1)
            except ValueError as exc:
                return FitsLayout(size, tuple(hdus), f"HDU {len(hdus)}: {exc}")
            count = 0
            if naxis:
                count = 1
                # Random-groups HDUs (NAXIS1 = 0) are not used by IRIS but sized by the rule.
                for n in shape[1:] if shape and shape[0] == 0 else shape:
                    count *= n
            data_size = abs(bitpix) // 8 * gcount * (pcount + count)
            name = "PRIMARY" if not hdus else cards.get("EXTNAME", f"HDU{len(hdus)}").upper()
            span = HduSpan(len(hdus), name, offset, offset + header_len, data_size, bitpix, shape)
            if span.data_offset + data_size > size:
                return FitsLayout(size, tuple(hdus),
                                  f"HDU {span.index} ({name}) is cut off: its data end at byte "
                                  f"{span.data_offset + data_size}, the file has {size} bytes")
            hdus.append(span)
            offset = span.end
        if offset > size:
            # The data are all there but the last block's padding is not: astropy reads such
            # files, but a writer still appending would leave exactly this, so say so.
            return FitsLayout(size, tuple(hdus), f"the last HDU's padding ends at byte {offset}, "
                                                 f"the file has {size} bytes")
        return FitsLayout(size, tuple(hdus), None)
