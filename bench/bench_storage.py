"""What storing a frame costs, per byte: the S3 client, the S3 server, and lossless compression.

Starts a SeaweedFS (the dev stack's object store, ``iris_devstack.services.seaweedfs``) on
loopback and stores a ``--mib`` MiB file through the project's store (``S3Store.put_file``:
SHA-256 of the file, multipart with a SHA-256 per part, verification), once with the hash
handed in (what the real-time chain does for the raw frame, hashed at its claim) and once
plain ``put_object`` for comparison. CPU is counted per process (client: this process;
server: weed's process). Then lossless FITS tile compression of a simulated raw ramp (the
project's simulator, ``--size``², UTR10): ratio and CPU per MiB, compared with what the
server spends per MiB saved. Prints a machine-speed reference beside the figures.

    .venv/bin/python bench/bench_storage.py --mib 256 --size 2048
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack_cpu import format_reference, machine_reference  # noqa: E402

MiB = 1 << 20


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def store_costs(work: Path, mib: int) -> dict[str, dict[str, float]]:
    """Client and server core-seconds per GiB for each way of storing a file."""
    import numpy as np
    import psutil

    from iris_devstack.services.seaweedfs import SeaweedS3
    from iris_tasks.storage.base import sha256_file
    from iris_tasks.storage.s3 import S3Store

    path = work / "blob.fits"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 1 << 12, size=mib * MiB // 2, dtype=np.uint16).tobytes())
    known = sha256_file(path)
    out: dict[str, dict[str, float]] = {}
    with SeaweedS3(work / "seaweedfs", buckets=("bench",)) as s3:
        weed = psutil.Process(s3.pid)

        def server() -> float:
            t = weed.cpu_times()
            return t.user + t.system + t.children_user + t.children_system

        store = S3Store("bench", client=s3.client())
        client = s3.client()
        ways = {
            "put_file (hashes the file)": lambda i: store.put_file(path, f"a{i}"),
            "put_file (hash handed in)": lambda i: store.put_file(path, f"b{i}", sha256=known),
            "plain put_object, no checksum": lambda i: client.put_object(
                Bucket="bench", Key=f"c{i}", Body=path.read_bytes()),
        }
        for name, put in ways.items():
            runs = []
            for i in range(3):
                c0, s0 = cpu(), server()
                put(i)
                time.sleep(0.2)  # let the server finish its write-behind
                runs.append((cpu() - c0, server() - s0))
            best = min(runs)
            out[name] = {"client": best[0] * 1024 / mib, "server": best[1] * 1024 / mib}
    return out


def compression(size: int) -> dict[str, float]:
    """RICE_1 tile compression of a simulated raw ramp: ratio, compress and decompress CPU."""
    import numpy as np
    from astropy.io import fits

    from iris_tasks.simulate.night import simulate_frame

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.fits"
        simulate_frame(raw, "IMG1-SCI", "IMG1", size=size, exp_no=1, night="2026-12-06", seed=0)
        with fits.open(raw) as hdul:
            ramp = np.array(hdul["SCI"].data)  # (integrations, reads, y, x) uint16
    nbytes = ramp.nbytes
    c0 = cpu()
    buf = io.BytesIO()
    # One tile per detector row of one read (astropy's default tiling for RICE).
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(ramp, compression_type="RICE_1")]).writeto(buf)
    packed = cpu() - c0
    stored = len(buf.getvalue())
    buf.seek(0)
    c0 = cpu()
    with fits.open(buf) as hdul:
        same = bool(np.array_equal(hdul[1].data, ramp))
    unpacked = cpu() - c0
    return {"ratio": nbytes / stored, "mib": nbytes / MiB, "lossless": same,
            "compress_s_per_gib": packed * 1024 * MiB / nbytes,
            "decompress_s_per_gib": unpacked * 1024 * MiB / nbytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the stored file (MiB)")
    ap.add_argument("--size", type=int, default=2048, help="simulated raw frame size")
    args = ap.parse_args(argv)
    reference = machine_reference()
    with tempfile.TemporaryDirectory(prefix="iris-bench-storage-") as tmp:
        costs = store_costs(Path(tmp), args.mib)
    packed = compression(args.size)
    print(f"\nStoring a {args.mib} MiB file in SeaweedFS on this machine, core-seconds per GiB "
          "(best of 3):")
    for name, c in costs.items():
        print(f"  {name:<32} client {c['client']:5.2f}   server {c['server']:5.2f}")
    server = min(c["server"] for c in costs.values())
    saved = 1.0 - 1.0 / packed["ratio"]
    print(f"\nRICE_1 tile compression of a simulated {args.size}² UTR raw ramp "
          f"({packed['mib']:.0f} MiB, lossless: {packed['lossless']}): ratio {packed['ratio']:.2f}, "
          f"compress {packed['compress_s_per_gib']:.2f} core-s/GiB, decompress + compare "
          f"{packed['decompress_s_per_gib']:.2f} core-s/GiB")
    print(f"  per GiB of raw: compressing costs {packed['compress_s_per_gib']:.2f} core-s; it "
          f"saves {saved:.0%} of the bytes, i.e. ~{saved * server:.2f} core-s of this server "
          f"(on the same cores) and none where the store runs elsewhere")
    print(format_reference(reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
