"""Structural and data checks of a raw ramp file, cheap enough for every arriving frame.

:func:`iris_tasks.metadata.validate_file` runs these checks before it looks at the header
keywords, so the real-time classification, ``iris-drs info`` and the readout's own validation
give one verdict for a file. Nothing here reads the whole file: the headers are parsed block
by block, the data lengths are checked arithmetically against the file size, and the ramp is
sampled through a memory map on a sparse pixel grid (~4096 pixels per read: 32 rows x 128
columns of a full frame, every pixel of a 64x64 array, plus the reference rows): a
4096x4096x10 raw file (335 MB) is checked in ~10 ms from the page cache and in well under
0.1 s from disk (docs/raw-validation.md has the figures).

Each finding is a ``(keyword, message)`` pair, the form of
:class:`iris_tasks.metadata.MetadataError` problems. Findings are of two severities:

*Problems* (the frame is quarantined): nothing downstream can reduce the file, or what it
would produce is certainly wrong.

- file level (keyword ``FILE``): empty file; not a FITS file (gzip/bzip2/zip/xz data are named
  as such); truncated inside a header (no END card) or inside the data of any HDU (the
  file is shorter than the header-declared data length); more than :data:`MAX_HDUS` HDUs;
- header cards (keyword of the card, or ``HEADER``): bytes outside printable ASCII
  (0x20-0x7E, the FITS header character set), cards astropy cannot parse or that fail
  ``Card.verify('exception')`` (invalid value strings, lower-case keywords, ...);
- layout: no ``SCI`` image extension; no ``ASDF`` extension although the primary header has
  ``DATAMODL`` (the IRIS datamodels always write ASDF after SCI, so its absence means the file
  was cut exactly after SCI; a plain FITS file without DATAMODL needs only PRIMARY + SCI);
- data type and shape (keyword ``SCI``): anything but uint16 (BITPIX=16, BZERO=32768,
  BSCALE=1), e.g. float32 or int32 reads; not 3 (one ramp) or 4 (NUMRAMPS, NUMREADS, ny, nx)
  axes; an empty axis. The shape against NUMRAMPS/NUMREADS/XSIZE/YSIZE is checked by
  :func:`iris_tasks.metadata.validate_header` with the shape found here;
- implausible data (keyword ``SCI``, from the sample): every sampled value 0 (no data); one
  constant value everywhere; >= 99 % of the sampled values at 65535 (ADC full scale:
  saturated everything); a read whose sampled pixels all hold one value (a blank read); two
  consecutive reads identical in every sampled pixel (a repeated read: read noise makes
  real reads differ); reads that run backwards in time (see below).

*Warnings* (logged and returned, the frame is processed): bytes after the last HDU (the HDUs
the DRS reads are complete, astropy ignores the rest, and a frame of a night that cannot be
repeated should not be held back for it); a last HDU whose 2880-byte padding is short; 50-99 %
of the sampled values at 65535; a median ramp that falls by a few DN (bias drift, reset
anomaly) without the evidence below.

Backward reads. A real ramp accumulates charge, so the last read minus the first is >= 0
apart from read noise, 1/f noise and bias drift. Per ramp the sample gives
``d = last - first`` per pixel, corrected by the median ``d`` of the sampled reference pixels
(the 4-pixel detector border, where the array has one) to remove common-mode drift. With a
robust noise scale ``sigma = 1.4826 * MAD(d)``, a ramp is *backwards* (problem) when

- the pixels that change significantly fall: at least ``max(10, 0.2 %)`` of the sampled pixels
  fall more than 5 sigma below both zero and the median ``d``, ten times as many as rise
  5 sigma above both (stars, hot pixels, lamps and cosmic rays all make significant *rises*
  in a real ramp; a drift common to all pixels moves the median, not the tails), or
- (not for darks, which have no signal to reverse) the median ``d`` is below
  ``-max(10 DN, 10 standard errors)`` and 75 % of the sampled pixels fall.

The same two tests on each pair of consecutive reads find reads out of order in the middle
of a ramp. A dark or a faint sky is symmetric under reversal within the noise: reversing it
is not detectable and does not matter much either.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 2880
CARD = 80
MAX_HDUS = 64  # a raw frame has 2-3; more is not a raw ramp (and bounds the header scan)
MAX_HEADER_BLOCKS = 1000  # 36000 cards without END: not a FITS header
RAMP_BITPIX = 16
RAMP_BZERO = 32768
ADC_MAX = 65535
REFPIX = 4  # reference-pixel border of the H4RG, in full-frame pixels
FULL_SIZE = 4096
SAMPLE_PIXELS = 4096  # sampled pixels per read (all of them in arrays up to 64x64)
SAMPLE_COLUMNS = 128  # per sampled row: columns cost nothing, each row costs page reads
SAMPLE_MIN_ROWS = 32
TAIL_SIGMA = 5.0
TAIL_MIN_COUNT = 10
TAIL_MIN_FRACTION = 0.002
TAIL_RATIO = 10.0
BULK_MIN_DN = 10.0
BULK_STDERR = 10.0
BULK_FALLING_FRACTION = 0.75
WARN_BULK_DN = 3.0
SATURATED_PROBLEM_FRACTION = 0.99
SATURATED_WARNING_FRACTION = 0.5

_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
)
_DTYPES = {8: "uint8", 16: "int16", 32: "int32", 64: "int64", -32: "float32", -64: "float64"}


@dataclass
class HduLayout:
    """Where one HDU lies in the file, from its header alone."""

    index: int
    name: str
    xtension: str | None
    header_offset: int
    data_offset: int
    data_bytes: int
    bitpix: int
    axes: tuple[int, ...]  # FITS order: NAXIS1 (fastest) first
    header: Any = field(repr=False, default=None)  # astropy.io.fits.Header

    @property
    def data_end(self) -> int:
        return self.data_offset + self.data_bytes

    @property
    def padded_end(self) -> int:
        return self.data_offset + _padded(self.data_bytes)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (slowest axis first)."""
        return tuple(reversed(self.axes))

    @property
    def label(self) -> str:
        return f"HDU {self.index} ({self.name})"


@dataclass
class RawCheck:
    """Findings on one file: ``problems`` (quarantine), ``warnings`` (QA) and sample stats."""

    path: str
    size: int = 0
    hdus: list[HduLayout] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    invalid_keywords: set[str] = field(default_factory=set)  # cards dropped from ``values``
    stats: dict[str, Any] = field(default_factory=dict)
    complete: bool = False  # every HDU's header and data are in the file
    structure_ok: bool = False  # complete, and PRIMARY + SCI (+ ASDF) present
    data_ok: bool = False  # SCI is a uint16 ramp of 3 or 4 axes: the data can be sampled

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def primary(self) -> HduLayout | None:
        return self.hdus[0] if self.hdus else None

    @property
    def sci(self) -> HduLayout | None:
        return next((h for h in self.hdus if h.name == "SCI" and h.xtension == "IMAGE"), None)

    def values(self, index: int = 0) -> dict[str, Any]:
        """Keyword -> value of an HDU's header, without the cards that did not parse."""
        out: dict[str, Any] = {}
        if index >= len(self.hdus) or self.hdus[index].header is None:
            return out
        for card in self.hdus[index].header.cards:
            if card.keyword and card.keyword not in self.invalid_keywords \
                    and card.keyword not in ("COMMENT", "HISTORY") and card.keyword not in out:
                try:
                    out[card.keyword] = card.value
                except Exception:  # noqa: BLE001 - reported by _parse_cards already
                    continue
        return out


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# -- structure ------------------------------------------------------------------------------
def inspect_structure(path: str | os.PathLike[str]) -> RawCheck:
    """Parse every header and check every HDU's data length against the file size.

    Never raises for what is in the file: every defect is a finding in the returned
    :class:`RawCheck`. Only the headers are read (a few kB).
    """
    check = RawCheck(str(path))
    try:
        with open(path, "rb") as fh:
            check.size = os.fstat(fh.fileno()).st_size
            _scan_hdus(fh, check)
    except IsADirectoryError:
        check.problems.append(("FILE", "is a directory, not a FITS file"))
    except OSError as exc:
        check.problems.append(("FILE", f"cannot be read ({exc.strerror or exc})"))
    if check.complete:
        check.structure_ok = _check_layout(check)
    return check


def structure_complete(path: str | os.PathLike[str]) -> bool:
    """Whether a file holds complete FITS HDUs with PRIMARY and SCI: for a landing trigger
    that must not claim a file still being written (headers only, no data read)."""
    return inspect_structure(path).structure_ok


def _scan_hdus(fh, check: RawCheck) -> None:
    size = check.size
    if size == 0:
        check.problems.append(("FILE", "empty file (0 bytes)"))
        return
    head = fh.read(BLOCK)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            check.problems.append(("FILE", f"not a FITS file: {what} (land the uncompressed "
                                   "FITS file)"))
            return
    if not head.startswith(b"SIMPLE  ="):
        check.problems.append(("FILE", "not a FITS file: it does not start with 'SIMPLE  ='"))
        return
    offset = 0
    while offset < size:
        index = len(check.hdus)
        if index >= MAX_HDUS:
            check.problems.append(("FILE", f"more than {MAX_HDUS} HDUs: not a raw ramp file"))
            return
        fh.seek(offset)
        if index > 0:
            start = fh.read(8)
            if start != b"XTENSION":
                _trailing(fh, check, offset, start)
                break
            fh.seek(offset)
        hdu = _read_hdu(fh, check, index, offset)
        if hdu is None:
            return
        check.hdus.append(hdu)
        if hdu.data_end > size:
            missing = hdu.data_end - size
            check.problems.append(("FILE", f"truncated: {hdu.label} declares {hdu.data_bytes} "
                                   f"data bytes ending at byte {hdu.data_end}, but the file has "
                                   f"{size} bytes ({missing} missing)"))
            return
        if hdu.padded_end > size:
            check.warnings.append(("FILE", f"{hdu.label} is not padded to a multiple of {BLOCK} "
                                   f"bytes ({hdu.padded_end - size} bytes short)"))
            break
        offset = hdu.padded_end
    check.complete = True


def _trailing(fh, check: RawCheck, offset: int, start: bytes) -> None:
    """Bytes after the last complete HDU: a warning (see the module docstring)."""
    extra = check.size - offset
    fh.seek(offset)
    probe = fh.read(min(extra, 1 << 20))
    if not probe.strip(b"\0"):
        what = "zero bytes" if extra <= len(probe) else "bytes (zero in the first MiB)"
    else:
        what = f"bytes of unexpected data (starting {start[:8]!r})"
    check.warnings.append(("FILE", f"{extra} {what} after the last HDU (ignored)"))


def _read_hdu(fh, check: RawCheck, index: int, offset: int) -> HduLayout | None:
    """Read one header from ``offset``; None (with a problem) when it cannot be laid out."""
    blocks: list[bytes] = []
    end_card = None
    while end_card is None:
        if len(blocks) >= MAX_HEADER_BLOCKS:
            check.problems.append(("FILE", f"HDU {index}: no END card in the first "
                                   f"{MAX_HEADER_BLOCKS * BLOCK} header bytes"))
            return None
        block = fh.read(BLOCK)
        if len(block) < BLOCK:
            where = offset + BLOCK * len(blocks) + len(block)
            check.problems.append(("FILE", f"truncated inside the header of HDU {index}: the "
                                   f"file ends at byte {where} before its END card"))
            return None
        blocks.append(block)
        for i in range(0, BLOCK, CARD):
            if block[i:i + CARD].startswith(b"END") and not block[i + 3:i + CARD].strip(b" "):
                end_card = (len(blocks) - 1) * (BLOCK // CARD) + i // CARD
                break
    raw = b"".join(blocks)[:(end_card + 1) * CARD]
    text = _ascii_text(raw, index, check)
    header = _parse_cards(text, index, check)
    if header is None:
        return None
    data_offset = offset + len(blocks) * BLOCK
    return _layout(header, index, offset, data_offset, check)


def _ascii_text(raw: bytes, index: int, check: RawCheck) -> str:
    """Header bytes as text; bytes outside 0x20-0x7E are problems and become '?'."""
    bad = [i for i, b in enumerate(raw) if b < 0x20 or b > 0x7E]
    if not bad:
        return raw.decode("ascii")
    cards = sorted({i // CARD for i in bad})
    for c in cards[:5]:
        image = raw[c * CARD:(c + 1) * CARD]
        keyword = image[:8].decode("ascii", "replace").strip()
        first = next(i for i in bad if i // CARD == c)
        kw = keyword if keyword.isascii() and keyword.isprintable() and keyword else "HEADER"
        what = "non-ASCII byte" if raw[first] > 0x7E else "control character"
        check.problems.append((kw, f"{what} 0x{raw[first]:02X} in header card {c} of HDU {index} "
                               f"({image.decode('latin-1').rstrip()!r}); FITS headers are "
                               "printable ASCII"))
        if kw != "HEADER":
            check.invalid_keywords.add(kw)
    if len(cards) > 5:
        check.problems.append(("HEADER", f"bytes outside printable ASCII in {len(cards) - 5} "
                               f"more cards of HDU {index}"))
    return bytes(b if 0x20 <= b <= 0x7E else 0x3F for b in raw).decode("ascii")


def _parse_cards(text: str, index: int, check: RawCheck):
    """The header as astropy parses it; each card astropy rejects or warns about is a problem."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = fits.Header.fromstring(text)
    except Exception as exc:  # noqa: BLE001 - astropy raises several types for bad headers
        check.problems.append(("HEADER", f"HDU {index}: header cannot be parsed ({exc})"))
        return None
    reported = 0
    for number, card in enumerate(header.cards):
        if not card.keyword and not card.image.strip():
            continue  # blank card
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                card.verify("exception")
                _ = card.value
                error = None
            except Exception as exc:  # noqa: BLE001 - VerifyError, ValueError, ...
                error = _one_line(str(exc))
        if error is None and caught:
            error = _one_line(str(caught[0].message))
        if error is None:
            continue
        keyword = card.keyword or "HEADER"
        check.invalid_keywords.add(keyword)
        reported += 1
        if reported <= 10:
            check.problems.append((keyword, f"invalid header card {number} in HDU {index}: "
                                   f"{card.image.rstrip()!r} ({error})"))
    if reported > 10:
        check.problems.append(("HEADER", f"{reported - 10} more invalid cards in HDU {index}"))
    return header


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Verification reported", "Note: astropy"))]
    return " ".join(lines)[:200] or "rejected by astropy"


def _layout(header, index: int, offset: int, data_offset: int, check: RawCheck) -> HduLayout | None:
    """Data size from the mandatory keywords (BITPIX, NAXIS, NAXISn, PCOUNT, GCOUNT)."""
    def integer(key: str, default: int | None = None) -> int | None:
        if key in check.invalid_keywords:
            return None
        value = header.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    first = header.cards[0].keyword if len(header) else ""
    expected_first = "SIMPLE" if index == 0 else "XTENSION"
    if first != expected_first:
        check.problems.append(("FILE", f"HDU {index}: header starts with {first!r}, not "
                               f"{expected_first}"))
        return None
    bitpix = integer("BITPIX")
    naxis = integer("NAXIS")
    if bitpix not in _DTYPES or naxis is None or not 0 <= naxis <= 999:
        check.problems.append(("FILE", f"HDU {index}: BITPIX={header.get('BITPIX')!r} / "
                               f"NAXIS={header.get('NAXIS')!r} do not describe a data array"))
        return None
    axes = tuple(integer(f"NAXIS{i}") for i in range(1, naxis + 1))
    if any(a is None or a < 0 for a in axes):
        check.problems.append(("FILE", f"HDU {index}: NAXISn missing or negative "
                               f"({', '.join(f'NAXIS{i + 1}={a}' for i, a in enumerate(axes))})"))
        return None
    pcount = integer("PCOUNT", 0) if index else 0
    gcount = integer("GCOUNT", 1) if index else 1
    if pcount is None or gcount is None or pcount < 0 or gcount < 0:
        check.problems.append(("FILE", f"HDU {index}: invalid PCOUNT/GCOUNT"))
        return None
    nelem = math.prod(axes) if axes else 0
    data_bytes = abs(bitpix) // 8 * gcount * (pcount + nelem) if nelem or pcount else 0
    xtension = None
    if index:
        xtension = str(header.get("XTENSION", "")).strip().upper()
    name = str(header.get("EXTNAME", "PRIMARY" if index == 0 else "")).strip().upper()
    return HduLayout(index, name or f"#{index}", xtension, offset, data_offset, data_bytes,
                     bitpix, axes, header)


def _check_layout(check: RawCheck) -> bool:
    """The HDUs a raw ramp needs (returns whether they are there), and the SCI data type and
    dimensions (``check.data_ok``)."""
    sci = check.sci
    if sci is None:
        names = ", ".join(h.name for h in check.hdus)
        check.problems.append(("SCI", f"missing: no SCI image extension (the file has {names})"))
        return False
    primary = check.values(0)
    if "DATAMODL" in primary and not any(h.name == "ASDF" for h in check.hdus):
        check.problems.append(("ASDF", f"missing: DATAMODL={primary['DATAMODL']!r} files always "
                               "end with an ASDF extension after SCI (file cut after SCI?)"))
        return False
    before = len(check.problems)
    header = sci.header
    bzero = header.get("BZERO", 0) if "BZERO" not in check.invalid_keywords else None
    bscale = header.get("BSCALE", 1) if "BSCALE" not in check.invalid_keywords else None
    if not (sci.bitpix == RAMP_BITPIX and bzero == RAMP_BZERO and bscale in (1, 1.0)):
        if sci.bitpix == 16 and bzero == RAMP_BZERO:
            kind = "uint16 scaled by BSCALE"
        elif sci.bitpix == 32 and bzero == 2**31:
            kind = "uint32"
        else:
            kind = _DTYPES[sci.bitpix] + ("" if not bzero else " with an offset")
        check.problems.append(("SCI", f"data type {kind} (BITPIX={sci.bitpix}, BZERO={bzero}, "
                               f"BSCALE={bscale}); a raw ramp is uint16 (BITPIX=16, "
                               "BZERO=32768)"))
    ndim = len(sci.axes)
    if ndim not in (3, 4):
        shape = "x".join(str(a) for a in sci.shape) or "no data"
        check.problems.append(("SCI", f"{ndim}-D data ({shape}); a raw ramp has 4 axes "
                               "(NUMRAMPS, NUMREADS, ny, nx), or 3 for a single ramp"))
    elif 0 in sci.axes:
        check.problems.append(("SCI", f"empty data array (shape {sci.shape})"))
    check.data_ok = len(check.problems) == before
    return True


def ramp_shape(check: RawCheck) -> tuple[int, ...] | None:
    """The SCI shape as (nramps, nreads, ny, nx) (3-D = one ramp), or None without SCI."""
    sci = check.sci
    if sci is None:
        return None
    shape = sci.shape
    return (1, *shape) if len(shape) == 3 else shape


# -- data -----------------------------------------------------------------------------------
def _grid(lo: int, hi: int, n: int) -> np.ndarray:
    """At most ``n`` indices spread over [lo, hi)."""
    count = hi - lo
    if count <= n:
        return np.arange(lo, hi)
    return np.unique(np.linspace(lo, hi - 1, n).round().astype(np.intp))


def _reference_rows_cols(primary: dict[str, Any], ny: int,
                         nx: int) -> tuple[np.ndarray, np.ndarray]:
    """Array rows and columns that are reference pixels (the 4-pixel border of the detector).

    A full frame (SUBARRAY=FULL, or a 4096x4096 array without subarray keywords) has it on all
    sides, a simulated scaled-down detector included; a subarray only where it touches the
    detector's edge (XSTART/YSTART, 1-based full-frame coordinates)."""
    sub = str(primary.get("SUBARRAY", "")).strip().upper()
    xstart, ystart = primary.get("XSTART"), primary.get("YSTART")
    if sub == "FULL" or (xstart is None and ystart is None and ny == nx == FULL_SIZE):
        x0 = y0 = 1
        xfull, yfull = nx, ny
    elif isinstance(xstart, int) and isinstance(ystart, int):
        x0, y0, xfull, yfull = xstart, ystart, FULL_SIZE, FULL_SIZE
    else:
        return np.empty(0, np.intp), np.empty(0, np.intp)

    def border(start: int, n: int, full: int) -> np.ndarray:
        pos = np.arange(n) + start  # 1-based full-frame coordinate
        return np.flatnonzero((pos <= REFPIX) | (pos > full - REFPIX))

    return border(y0, ny, yfull), border(x0, nx, xfull)


@contextlib.contextmanager
def _mapped(path: str, offset: int, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The big-endian int16 array at ``offset`` as a read-only memory map without read-ahead.

    MADV_RANDOM matters when the file is not in the page cache: the default read-around
    turns each sampled row's page fault into ~128 kB of disk reads (measured on a 4096^2 x 10
    file: 0.25 s cold with it, 0.07 s without).
    """
    nbytes = 2 * math.prod(shape)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), offset - start + nbytes, access=mmap.ACCESS_READ,
                           offset=start)
    try:
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        array = np.ndarray(shape, dtype=">i2", buffer=mapped, offset=offset - start)
        yield array
        del array
    finally:
        try:
            mapped.close()
        except BufferError:  # a view outlived the sample (never here); the GC unmaps it
            pass


def check_ramp_data(check: RawCheck, *, dark: bool = False,
                    pixels: int = SAMPLE_PIXELS) -> None:
    """Sample the SCI ramp on a sparse grid and add the data findings to ``check``.

    ``dark``: the frame is a dark (no illumination), for which a falling median is a warning
    only. Does nothing when the structure or the data type is wrong (already a problem).
    """
    if not check.data_ok:
        return
    t0 = time.perf_counter()
    sci = check.sci
    assert sci is not None
    shape = ramp_shape(check)
    assert shape is not None
    nramps, nreads, ny, nx = shape
    primary = check.values(0)
    ref_rows, ref_cols = _reference_rows_cols(primary, ny, nx)
    act_rows = np.setdiff1d(np.arange(ny), ref_rows) if ref_rows.size else np.arange(ny)
    act_cols = np.setdiff1d(np.arange(nx), ref_cols) if ref_cols.size else np.arange(nx)
    if act_rows.size == 0 or act_cols.size == 0:  # nothing but reference pixels
        act_rows, act_cols = np.arange(ny), np.arange(nx)
        ref_rows = ref_cols = np.empty(0, np.intp)
    # Wide and short: a sampled row costs its pages in every read (a 4096-pixel row is two
    # 4 kB pages), its columns are free once those are read.
    ncols = min(act_cols.size, SAMPLE_COLUMNS)
    nrows = min(act_rows.size, max(SAMPLE_MIN_ROWS, -(-pixels // ncols)))
    rows = act_rows[_grid(0, act_rows.size, nrows)]
    cols = act_cols[_grid(0, act_cols.size, ncols)]
    with _mapped(check.path, sci.data_offset, shape) as mm:
        # Rows by fancy index, then columns: one copy of the sampled pixels only.
        sample = mm[:, :, rows][..., cols].astype(np.int32) + RAMP_BZERO
        ref = None
        if ref_rows.size:  # the top/bottom reference rows, on the sampled columns
            ref = mm[:, :, ref_rows][..., cols].astype(np.int32) + RAMP_BZERO
        elif ref_cols.size:
            ref = mm[:, :, rows][..., ref_cols].astype(np.int32) + RAMP_BZERO
        del mm  # the map closes when the block ends only if no view of it is left
    _judge_sample(check, sample, ref, dark=dark)
    check.stats.update(sample_pixels=int(rows.size * cols.size),
                       reference_pixels=0 if ref is None else int(ref[0, 0].size),
                       sample_seconds=round(time.perf_counter() - t0, 6))


def _judge_sample(check: RawCheck, sample: np.ndarray, ref: np.ndarray | None, *,
                  dark: bool) -> None:
    """The plausibility rules of the module docstring on (nramps, nreads, rows, cols)."""
    nramps, nreads = sample.shape[:2]
    everything = sample if ref is None else np.concatenate(
        [sample.reshape(nramps, nreads, -1), ref.reshape(nramps, nreads, -1)], axis=2)
    lo, hi = int(everything.min()), int(everything.max())
    saturated = float(np.mean(everything == ADC_MAX))
    check.stats.update(min=lo, max=hi, saturated_fraction=round(saturated, 4),
                       median_first_read=float(np.median(sample[:, 0])))
    if hi == 0:
        check.problems.append(("SCI", "all-zero data: every sampled pixel is 0 in every read"))
        return
    if saturated >= SATURATED_PROBLEM_FRACTION:
        check.problems.append(("SCI", f"saturated: {saturated:.1%} of the sampled pixel reads are "
                               f"{ADC_MAX} (ADC full scale)"))
        return
    if lo == hi:
        check.problems.append(("SCI", f"constant data: every sampled pixel is {lo} in every read"))
        return
    if saturated >= SATURATED_WARNING_FRACTION:
        check.warnings.append(("SCI", f"{saturated:.1%} of the sampled pixel reads are {ADC_MAX} "
                               "(ADC full scale)"))
    flat_reads = [(r, k, int(everything[r, k].flat[0]))
                  for r in range(nramps) for k in range(nreads)
                  if everything[r, k].min() == everything[r, k].max()]
    if flat_reads:
        listed = ", ".join(f"ramp {r} read {k} = {v}" for r, k, v in flat_reads[:5])
        check.problems.append(("SCI", f"blank read: every sampled pixel holds one value in "
                               f"{len(flat_reads)} read(s) ({listed})"))
        return
    if nreads < 2:
        return
    repeated = [(r, k) for r in range(nramps) for k in range(nreads - 1)
                if np.array_equal(everything[r, k], everything[r, k + 1])]
    if repeated:
        listed = ", ".join(f"ramp {r} reads {k}/{k + 1}" for r, k in repeated[:5])
        check.problems.append(("SCI", f"repeated read: consecutive reads identical in every "
                               f"sampled pixel ({listed}); real reads differ by read noise"))
        return
    for r in range(nramps):
        if _judge_direction(check, r, sample[r], None if ref is None else ref[r], dark=dark):
            return


def _direction(d: np.ndarray, d_ref: np.ndarray | None) -> dict[str, float]:
    """Statistics of one read difference ``d`` (sampled pixels), reference-corrected."""
    d = d.ravel().astype(np.float64)
    if d_ref is not None and d_ref.size >= 16:
        d = d - float(np.median(d_ref))
    med = float(np.median(d))
    sigma = max(1.4826 * float(np.median(np.abs(d - med))), 1.0)
    n = d.size
    return {
        "median": med, "sigma": sigma, "stderr": 1.2533 * sigma / math.sqrt(n),
        # Beyond the bulk as well as beyond zero: a common drift of every pixel (a dark's
        # reset anomaly) is not a tail, and a flat's dead pixels (at 0, far below the
        # median) do not fall.
        "rising": int(np.count_nonzero(d > max(med, 0.0) + TAIL_SIGMA * sigma)),
        "falling": int(np.count_nonzero(d < min(med, 0.0) - TAIL_SIGMA * sigma)),
        "falling_fraction": float(np.count_nonzero(d < 0)) / n, "n": n,
    }


def _tail_backward(s: dict[str, float]) -> bool:
    need = max(TAIL_MIN_COUNT, math.ceil(TAIL_MIN_FRACTION * s["n"]))
    return s["falling"] >= need and s["falling"] >= TAIL_RATIO * max(s["rising"], 1)


def _bulk_backward(s: dict[str, float]) -> bool:
    return (s["median"] < -max(BULK_MIN_DN, BULK_STDERR * s["stderr"])
            and s["falling_fraction"] >= BULK_FALLING_FRACTION)


def _judge_direction(check: RawCheck, ramp: int, reads: np.ndarray, ref: np.ndarray | None, *,
                     dark: bool) -> bool:
    """Backward or out-of-order reads in one ramp; True when a problem was added."""
    nreads = reads.shape[0]
    total = _direction(reads[-1] - reads[0], None if ref is None else ref[-1] - ref[0])
    if ramp == 0:
        check.stats.update(median_signal_dn=round(total["median"], 2),
                           falling_fraction=round(total["falling_fraction"], 4),
                           rising_pixels=total["rising"], falling_pixels=total["falling"])
    if _tail_backward(total) or (not dark and _bulk_backward(total)):
        check.problems.append(("SCI", f"reads decrease with time (ramp {ramp}: last - first read "
                               f"median {total['median']:+.0f} DN, {total['falling']} sampled "
                               f"pixels fall by > {TAIL_SIGMA:g} sigma, {total['rising']} rise); "
                               "reads in reverse order?"))
        return True
    # Each pair of consecutive reads (for 2 reads the pair is the total, judged above).
    for k in range(nreads - 1 if nreads > 2 else 0):
        pair = _direction(reads[k + 1] - reads[k], None if ref is None else ref[k + 1] - ref[k])
        if _tail_backward(pair) or (not dark and _bulk_backward(pair)):
            check.problems.append(("SCI", f"reads out of order (ramp {ramp}: read {k + 1} is below "
                                   f"read {k} by > {TAIL_SIGMA:g} sigma in {pair['falling']} "
                                   f"sampled pixels, above it in {pair['rising']})"))
            return True
    if total["median"] < -max(WARN_BULK_DN, 5 * total["stderr"]):
        check.warnings.append(("SCI", f"median ramp falls by {-total['median']:.1f} DN (ramp "
                               f"{ramp}, {total['falling_fraction']:.0%} of the sampled pixels "
                               "fall): bias drift, or reads out of order?"))
    return False


def check_raw_file(path: str | os.PathLike[str], *, dark: bool = False) -> RawCheck:
    """:func:`inspect_structure` then :func:`check_ramp_data`: every finding on one file."""
    check = inspect_structure(path)
    check_ramp_data(check, dark=dark)
    return check
