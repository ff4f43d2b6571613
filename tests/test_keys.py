"""Object key names for any landing file name (iris_tasks.storage.keys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iris_tasks.storage import LocalStore, StorageError, parse_product_key, product_key
from iris_tasks.storage.base import validate_key
from iris_tasks.storage.keys import decode_name, encode_name, key_filename, name_digest

NIGHT = "2026-11-23"
ODD_NAMES = [
    "good science with spaces 0005.fits",
    "científico_Ωmega_0006.fits",
    "日本語.fits",
    "frame (1).FITS",
    "a%20b.fits",
    "tab\there.fits",
    "-leading-dash.fits",
    "semi;colon&amp.fits",
    "x" * 300 + ".fits",
    "no_extension here",
    "name.with.many.dots and space.fits",
    "compressed frame.fits.gz",
    "undecodable-\udcff.fits",  # a filesystem name that is not UTF-8 (surrogateescape)
]


def test_safe_names_are_kept():
    for name in ["iris_0001_raw.fits", "2026-11-20_IMG1_IMG1-SCI_0001.fits", "a+b.fits",
                 "x_rate.fits", "IMG1.0001.fits"]:
        assert key_filename(name) == name
        assert product_key(NIGHT, "IMG1", "IMG1-SCI", name, "raw") == \
            f"raw/{NIGHT}/IMG1/IMG1-SCI/{name}"


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_name_gives_a_valid_deterministic_key(name):
    key = product_key(NIGHT, "IMG1", "IMG1-SCI", name, "raw")
    assert validate_key(key) == key
    assert key == product_key(NIGHT, "IMG1", "IMG1-SCI", f"/landing/dir/{name}", "raw")
    base = key.rsplit("/", 1)[1]
    assert base == key_filename(name) and base.isascii() and len(base) < 200
    assert name_digest(name) in base  # the hash of the original name
    assert key_filename(base) == base  # idempotent: a key name is already safe
    assert parse_product_key(key) == {"kind": "raw", "night": NIGHT, "detector": "IMG1",
                                      "obsname": "IMG1-SCI", "filename": base}
    assert decode_name(encode_name(name)) == name and encode_name(name).isascii()


def test_readable_and_extension_kept():
    assert key_filename("M31 field é.fits") == f"M31_field_e.{name_digest('M31 field é.fits')}.fits"
    assert key_filename("compressed frame.fits.gz").endswith(".fits.gz")
    assert key_filename("frame (1).FITS").startswith("frame_1.")
    assert key_filename("日本語.fits").startswith("file.")


def test_names_that_clean_up_alike_do_not_collide():
    names = ["a b.fits", "a_b.fits", "a  b.fits", "a\tb.fits", "a?b.fits", "á b.fits",
             "a b.fits ", "A b.fits"]
    keys = [key_filename(n) for n in names]
    assert len(set(keys)) == len(names), keys


def test_detector_and_obsname_stay_strict():
    for bad in [dict(detector="IMG 1"), dict(detector="ÍMG1"), dict(obsname="../x"),
                dict(obsname="IMG1 SCI"), dict(night="2026-13-45"), dict(kind="junk")]:
        kw = dict(night=NIGHT, detector="IMG1", obsname="IMG1-SCI", filename="a b.fits",
                  kind="raw")
        kw.update(bad)
        with pytest.raises((StorageError, ValueError)):
            product_key(**kw)
    with pytest.raises(StorageError):
        key_filename("")


def test_odd_names_archive_in_a_store(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    seen = set()
    for i, name in enumerate(ODD_NAMES):
        src = tmp_path / "in" / f"{i}.fits"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(f"frame {i}".encode())
        key = product_key(NIGHT, "IMG1", "IMG1-SCI", name, "raw")
        info = store.put_file(src, key, {"rawfile": encode_name(name)})
        assert store.exists(key) and key not in seen
        seen.add(key)
        assert decode_name(store.head(info.key).metadata["rawfile"]) == name
