"""A generated corpus of malformed (and a few good) raw files, each with its expected outcome.

Test tool, not DRS code: it uses the simulator for the good frames and derives every bad file
from them, so each case differs from a good frame by the one defect it is about (plus the
bytes that defect moves). ``write_corpus(directory)`` writes the files and returns one
:class:`CorpusCase` per file::

    expected    what the real-time path must make of the file
    quarantine  validate_file raises MetadataError; the chain ends it ``quarantined`` with a
                reason.json whose problems contain ``reason``
    duplicate   same bytes as a good frame under another name: claimed as a duplicate
    ignored     not a frame for the landing scan (compressed, hidden, partial, in a
                sub-directory, a symlink): never claimed
    done        a good frame (some with odd names or harmless trailing bytes): reduced and
                archived, raw included

Every file's content is unique except the duplicate's, so a burst of the whole corpus
claims each file once. All good frames are IMG1 frames of one night with ``nreads`` UTR
reads, so one IMG1 reference set (``readpatts=(f"UTR{nreads}",)``, filter Ks) reduces them.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from iris_tasks import rawcheck

NIGHT = "2026-11-20"
EXPECTED = ("quarantine", "ignored", "duplicate", "done")


@dataclass(frozen=True)
class CorpusCase:
    """One file of the corpus and what must become of it."""

    name: str
    relpath: str  # relative to the corpus directory
    expected: str  # one of EXPECTED
    reason: str  # substring of the quarantine problems ("" unless expected == "quarantine")
    description: str

    def path(self, directory: str | os.PathLike[str]) -> Path:
        return Path(directory) / self.relpath


# -- good frames ----------------------------------------------------------------------------
GOOD_FRAMES = (
    # (case name, file name, OBSNAME, exp_no)
    ("good_dark", "good_dark_0001.fits", "IMG1-DRK", 1),
    ("good_flat", "good_flat_0002.fits", "IMG1-NFF", 2),
    ("good_sky", "good_sky_0003.fits", "IMG1-SKY", 3),
    ("good_science", "good_science_0004.fits", "IMG1-SCI", 4),
    ("name_with_spaces", "good science with spaces 0005.fits", "IMG1-SCI", 5),
    ("name_non_ascii", "científico_Ωmega_0006.fits", "IMG1-SCI", 6),
    ("trailing_garbage", "trailing_garbage_0007.fits", "IMG1-SCI", 7),
)


def _simulate(out: Path, obsname: str, exp_no: int, *, size: int, nreads: int, seed: int) -> Path:
    from iris_tasks.simulate import simulate_frame

    path, _ = simulate_frame(out, obsname, "IMG1", size=size, nreads=nreads, seed=seed,
                             exp_no=exp_no, night=NIGHT)
    return path


# -- mutations ------------------------------------------------------------------------------
def _with_header(base: Path, dest: Path, change: dict[str, object | None]) -> None:
    """``base`` with primary keywords set (None: removed)."""
    with fits.open(base) as hdul:
        header = hdul[0].header
        for key, value in change.items():
            if value is None:
                header.remove(key, ignore_missing=True)
            else:
                header[key] = value
        hdul.writeto(dest, output_verify="ignore")


def _with_sci(base: Path, dest: Path, make: Callable[[np.ndarray], np.ndarray]) -> None:
    """``base`` with its SCI array replaced by ``make(reads)`` (astropy sets BITPIX/BZERO)."""
    with fits.open(base) as hdul:
        reads = hdul["SCI"].data.copy()
        header = hdul["SCI"].header.copy()
        for key in ("BZERO", "BSCALE"):
            header.remove(key, ignore_missing=True)
        sci = fits.ImageHDU(make(reads), header=header, name="SCI")
        hdus = [hdul[0]] + [sci if h.name == "SCI" else h for h in hdul[1:]]
        fits.HDUList(hdus).writeto(dest)


def _patch_card(base: Path, dest: Path, keyword: str, image: bytes) -> None:
    """``base`` with the primary card of ``keyword`` replaced byte for byte by ``image``."""
    data = bytearray(base.read_bytes())
    start = data.find(keyword.encode().ljust(8))
    assert start >= 0 and start % 80 == 0, keyword
    data[start:start + 80] = image.ljust(80, b" ")[:80]
    dest.write_bytes(bytes(data))


def _cut(base: Path, dest: Path, length: int) -> None:
    dest.write_bytes(base.read_bytes()[:length])


def write_corpus(directory: str | os.PathLike[str], *, size: int = 64, nreads: int = 4,
                 seed: int = 20261120) -> list[CorpusCase]:
    """Write the corpus into ``directory`` (created); returns its cases, good frames first
    (the order a test lands them in, so the duplicate follows its original)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}-bases"
    work.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    cases: list[CorpusCase] = []

    def add(name: str, relpath: str, expected: str, reason: str, description: str) -> Path:
        assert expected in EXPECTED
        cases.append(CorpusCase(name, relpath, expected, reason, description))
        return out / relpath

    good: dict[str, Path] = {}
    for name, filename, obsname, exp_no in GOOD_FRAMES:
        # Simulated under a plain name (FILENAME must be ASCII), then renamed into the corpus.
        made = _simulate(work / f"{name}.fits", obsname, exp_no, size=size, nreads=nreads,
                         seed=seed)
        path = out / filename
        os.replace(made, path)
        good[name] = path
        description = f"a good {obsname} frame"
        if name == "trailing_garbage":  # data intact: a QA warning, not a quarantine
            with open(path, "ab") as fh:
                fh.write(b"not FITS: bytes after the last HDU\n" * 8)
            description += " followed by 280 bytes of text (QA warning only)"
        elif not name.startswith("good_"):
            description += f" named {filename!r}"
        add(name, filename, "done", "", description)
    sci = _simulate(work / "base_science.fits", "IMG1-SCI", 20, size=size, nreads=nreads,
                    seed=seed)
    flat = _simulate(work / "base_flat.fits", "IMG1-NFF", 21, size=size, nreads=nreads, seed=seed)
    layout = rawcheck.inspect_structure(sci).hdus
    assert [h.name for h in layout] == ["PRIMARY", "SCI", "ASDF"], layout
    primary_hdr, sci_hdu, asdf_hdu = layout

    # The file itself.
    add("empty", "empty_file.fits", "quarantine", "empty file",
        "zero bytes").write_bytes(b"")
    add("random_bytes", "random_bytes.fits", "quarantine", "not a FITS file",
        "8000 random bytes named .fits").write_bytes(rng.bytes(8000))
    add("gzip_named_fits", "gzip_named.fits", "quarantine", "gzip-compressed",
        "a gzip-compressed good frame named .fits").write_bytes(
            gzip.compress(sci.read_bytes(), mtime=0))
    add("text_file", "notes.fits", "quarantine", "not a FITS file",
        "a text file named .fits").write_text("observing notes, not a frame\n" * 20)
    _cut(sci, add("truncated_primary_header", "truncated_primary_header.fits", "quarantine",
                  "truncated inside the header of HDU 0",
                  "cut at byte 1000, inside the primary header"), 1000)
    _cut(sci, add("truncated_sci_header", "truncated_sci_header.fits", "quarantine",
                  "truncated inside the header of HDU 1", "cut inside the SCI header"),
         sci_hdu.header_offset + 400)
    _cut(sci, add("truncated_in_data", "truncated_in_data.fits", "quarantine",
                  "truncated: HDU 1 (SCI)", "cut half-way through the SCI data"),
         sci_hdu.data_offset + sci_hdu.data_bytes // 2)
    _cut(sci, add("truncated_one_byte", "truncated_one_byte.fits", "quarantine",
                  "(1 missing)", "the last byte of the SCI data missing"),
         sci_hdu.data_end - 1)
    _cut(sci, add("missing_asdf", "missing_last_extension.fits", "quarantine", "ASDF: missing",
                  "cut exactly after SCI: the ASDF extension is missing"), sci_hdu.padded_end)
    _cut(sci, add("truncated_in_asdf", "truncated_in_asdf.fits", "quarantine",
                  "truncated: HDU 2 (ASDF)", "cut inside the ASDF extension's data"),
         asdf_hdu.data_offset + 10)
    assert primary_hdr.data_bytes == 0

    # Header cards.
    _patch_card(sci, add("invalid_card_value", "invalid_card_value.fits", "quarantine",
                         "NUMREADS: invalid header card", "NUMREADS= 4x (not a FITS value)"),
                "NUMREADS", b"NUMREADS= 4x")
    _patch_card(sci, add("unquoted_string", "unquoted_string.fits", "quarantine",
                         "OBSNAME: invalid header card", "OBSNAME = IMG1-SCI without quotes"),
                "OBSNAME", b"OBSNAME = IMG1-SCI")
    _patch_card(sci, add("lowercase_keyword", "lowercase_keyword.fits", "quarantine",
                         "invalid header card", "a card whose keyword is lower case"),
                "TARGNAME", b"targname= 'SIMFIELD'")
    _patch_card(sci, add("non_ascii_header", "non_ascii_header.fits", "quarantine",
                         "non-ASCII byte 0xC3", "UTF-8 'é' in the TARGNAME value"),
                "TARGNAME", "TARGNAME= 'M31 étoile'".encode())
    _patch_card(sci, add("control_char_header", "control_char_header.fits", "quarantine",
                         "control character 0x09", "a TAB character in a header card"),
                "TARGNAME", b"TARGNAME= 'SIM\tFIELD'")

    # Layout, data type and shape.
    with fits.open(sci) as hdul:
        hdul["SCI"].header["EXTNAME"] = "RAW"
        hdul.writeto(add("no_sci", "no_sci_extension.fits", "quarantine", "SCI: missing",
                         "the ramp extension is named RAW, not SCI"))
    _with_sci(sci, add("float32_reads", "float32_reads.fits", "quarantine", "data type float32",
                       "the reads stored as float32 (BITPIX=-32)"), lambda r: r.astype(np.float32))
    _with_sci(sci, add("int32_reads", "int32_reads.fits", "quarantine", "data type int32",
                       "the reads stored as int32 (BITPIX=32)"), lambda r: r.astype(np.int32))
    _with_sci(sci, add("int16_signed", "int16_signed.fits", "quarantine", "data type int16",
                       "signed 16-bit reads (BITPIX=16 without BZERO)"),
              lambda r: (r.astype(np.int32) - 32768).astype(np.int16))
    _with_sci(sci, add("two_dimensional", "two_dimensional.fits", "quarantine", "2-D data",
                       "only the last read, as a 2-D image"), lambda r: r[0, -1].copy())
    _with_header(sci, add("numreads_mismatch", "numreads_mismatch.fits", "quarantine",
                          f"NUMREADS: {nreads + 1} but the data hold {nreads} reads",
                          "NUMREADS says one read more than the data hold"),
                 {"NUMREADS": nreads + 1, "READPATT": f"UTR{nreads + 1}"})
    _with_header(sci, add("subarray_mismatch", "subarray_mismatch.fits", "quarantine",
                          "does not match the data",
                          "XSIZE/YSIZE say a 32x32 subarray, the data are 64x64"),
                 {"XSIZE": size // 2, "YSIZE": size // 2})

    # Implausible data.
    _with_sci(sci, add("all_zero", "all_zero.fits", "quarantine", "all-zero data",
                       "every read all zeros"), lambda r: np.zeros_like(r))
    _with_sci(sci, add("constant", "constant.fits", "quarantine", "constant data",
                       "every pixel of every read 12000"), lambda r: np.full_like(r, 12000))
    _with_sci(sci, add("all_saturated", "all_saturated.fits", "quarantine", "saturated",
                       "every pixel of every read 65535"), lambda r: np.full_like(r, 65535))
    _with_sci(sci, add("reversed_reads", "reversed_reads.fits", "quarantine",
                       "reads decrease with time", "the science reads in reverse order"),
              lambda r: r[:, ::-1].copy())
    _with_sci(flat, add("reversed_flat", "reversed_flat.fits", "quarantine",
                        "reads decrease with time", "a dome flat's reads in reverse order"),
              lambda r: r[:, ::-1].copy())

    def swap_middle(r: np.ndarray) -> np.ndarray:
        out = r.copy()
        out[:, [1, 2]] = out[:, [2, 1]]
        return out

    _with_sci(flat, add("reads_out_of_order", "reads_out_of_order.fits", "quarantine",
                        "reads out of order", "a dome flat with reads 1 and 2 swapped"),
              swap_middle)

    def repeat(r: np.ndarray) -> np.ndarray:
        out = r.copy()
        out[:, 2] = out[:, 1]
        return out

    _with_sci(sci, add("repeated_read", "repeated_read.fits", "quarantine", "repeated read",
                       "read 2 is a copy of read 1"), repeat)

    def blank(r: np.ndarray) -> np.ndarray:
        out = r.copy()
        out[:, 1] = 0
        return out

    _with_sci(sci, add("blank_read", "blank_read.fits", "quarantine", "blank read",
                       "read 1 all zeros (a dropped read)"), blank)

    # Header keywords (validate_header).
    keyword_cases = [
        ("missing_obsname", "OBSNAME: missing", "no OBSNAME", {"OBSNAME": None}),
        ("unknown_obsname", "'IMG1-XYZ' is not one of", "OBSNAME IMG1-XYZ",
         {"OBSNAME": "IMG1-XYZ"}),
        ("obsname_detector_mismatch", "'IFS' cannot take IMG1-SCI",
         "an imager OBSNAME on the IFS detector", {"DETECTOR": "IFS"}),
        ("obstype_inconsistent", "not an OBSTYPE=CAL name", "IMG1-SCI with OBSTYPE=CAL",
         {"OBSTYPE": "CAL"}),
        ("missing_detector", "DETECTOR: missing", "no DETECTOR", {"DETECTOR": None}),
        ("wrong_instrument", "INSTRUME: 'NIRC2'", "INSTRUME=NIRC2", {"INSTRUME": "NIRC2"}),
        ("bad_date_format", "expected YYYY-MM-DD", "DATE-OBS 20/11/2026",
         {"DATE-OBS": "20/11/2026"}),
        ("impossible_date", "not a calendar date", "DATE-OBS 2026-02-30",
         {"DATE-OBS": "2026-02-30"}),
        ("date_1999", "before 2020-01-01", "DATE-OBS 1999-12-31 (a reset clock)",
         {"DATE-OBS": "1999-12-31"}),
        ("bad_time", "not a time of day", "TIME-OBS 25:61:00", {"TIME-OBS": "25:61:00"}),
        ("negative_exptime", "EXPTIME: -4.2; expected a positive", "EXPTIME -4.2",
         {"EXPTIME": -4.2}),
        ("numreads_zero", "NUMREADS: 0; expected an integer >= 1", "NUMREADS 0",
         {"NUMREADS": 0}),
        ("sampmode_unknown", "SAMPMODE: 'FOWLER' is not one of", "SAMPMODE FOWLER",
         {"SAMPMODE": "FOWLER"}),
    ]
    for name, reason, description, change in keyword_cases:
        _with_header(sci, add(name, f"{name}.fits", "quarantine", reason, description), change)

    # Not frames for the landing scan, and a duplicate.
    shutil.copyfile(good["good_science"], add(
        "duplicate", "duplicate_of_good_science.fits", "duplicate", "",
        "the bytes of good_science_0004.fits under another name"))
    add("compressed", "compressed_good.fits.gz", "ignored", "",
        "a gzip-compressed frame (.fits.gz)").write_bytes(gzip.compress(flat.read_bytes(), mtime=0))
    sub = add("in_subdirectory", "subdir/frame_in_subdir.fits", "ignored", "",
              "a frame in a sub-directory of the landing area")
    sub.parent.mkdir(exist_ok=True)
    shutil.copyfile(flat, sub)
    os.symlink(good["good_flat"].name, add("symlink", "symlink_to_good_flat.fits", "ignored", "",
                                           "a symbolic link to a good frame"))
    shutil.copyfile(flat, add("hidden", ".hidden_frame.fits", "ignored", "",
                              "a hidden file (.name.fits)"))
    shutil.copyfile(flat, add("partial", "frame_being_written.fits.part", "ignored", "",
                              "a partial upload (.part)"))
    shutil.rmtree(work)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
