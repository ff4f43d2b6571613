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

Configurations of the server (and of the client's multipart part size) are compared with
``--config``, each ``'NAME: TOKEN ...'``: a token ``-flag=value`` is a ``weed mini`` flag (added
after the dev stack's own, so it overrides them), ``part=N`` the client's part size in MiB,
``threshold=N`` the size in MiB from which the client uploads in parts, any other ``KEY=VALUE`` an environment variable of the weed process (``GOGC=400``). All
servers run at once and the uploads alternate between them, in a rotated order each round,
so that load from other work on the machine falls on every configuration alike; the table
gives the median and the range over ``--rounds``:

    .venv/bin/python bench/bench_storage.py --mib 256 --rounds 7 --no-compression \
        --config 'stack:' --config 'chunk 16 MiB: -filer.maxMB=16' --config 'gc: GOGC=400'
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack_cpu import format_reference, machine_reference  # noqa: E402

MiB = 1 << 20
log = logging.getLogger("bench_storage")


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


class Config:
    """One configuration to compare: weed flags, weed environment, client part size."""

    def __init__(self, spec: str):
        name, _, tokens = spec.partition(":")
        self.name = name.strip() or "stack"
        self.flags: list[str] = []
        self.env: dict[str, str] = {}
        self.part_mib: int | None = None
        self.threshold_mib: int | None = None
        for token in tokens.split():
            key, eq, value = token.partition("=")
            if token.startswith("-"):
                self.flags.append(token)
            elif key == "part" and value.isdigit():
                self.part_mib = int(value)
            elif key == "threshold" and value.isdigit():
                self.threshold_mib = int(value)
            elif eq and key:
                self.env[key] = value
            else:
                raise SystemExit(f"--config {spec!r}: cannot read {token!r} (expected -flag=value, "
                                 "part=MiB or KEY=VALUE)")


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def compare_configs(work: Path, mib: int, configs: list[Config], rounds: int,
                    small: int, profile_dir: Path | None = None
                    ) -> dict[str, dict[str, list[float]]]:
    """Per configuration and round: client and server core-s per GiB of a ``put_file`` (hash
    handed in, as the real-time chain stores a raw frame), of a verified ``get_file``, and the
    server's core-ms per small (256 KiB) object stored. All servers run side by side; each
    round visits them in a rotated order. ``profile_dir``: each weed writes a CPU profile
    there (``<n>.prof``, n the configuration's position), over its whole run."""
    import numpy as np
    import psutil

    from iris_devstack.services.seaweedfs import SeaweedS3
    from iris_tasks.storage.base import sha256_file
    from iris_tasks.storage.s3 import S3Store, default_transfer_config

    path = work / "blob.fits"
    rng = np.random.default_rng(0)
    path.write_bytes(rng.integers(0, 1 << 12, size=mib * MiB // 2, dtype=np.uint16).tobytes())
    known = sha256_file(path)
    little = work / "small.fits"
    little.write_bytes(rng.integers(0, 1 << 12, size=128 * 1024, dtype=np.uint16).tobytes())
    out = {c.name: {k: [] for k in ("put client", "put server", "put wall", "get client",
                                     "get server", "small server ms")} for c in configs}
    with contextlib.ExitStack() as stack:
        servers = []
        for i, c in enumerate(configs):
            profile = [f"-cpuprofile={profile_dir / f'{i}.prof'}"] if profile_dir else []
            s3 = SeaweedS3(work / f"seaweedfs-{i}", buckets=("bench",),
                           weed_args=[*c.flags, *profile], weed_env=c.env)
            # Stopped with time to spare: weed writes its profile on SIGTERM.
            stack.callback(s3.stop, 60.0)
            s3.start()
            tc = default_transfer_config(
                **({"multipart_chunksize": c.part_mib * MiB} if c.part_mib else {}),
                **({"multipart_threshold": c.threshold_mib * MiB} if c.threshold_mib else {}))
            servers.append((c, S3Store("bench", client=s3.client(), transfer_config=tc),
                            psutil.Process(s3.pid)))

        def server_cpu(weed: Any) -> float:
            t = weed.cpu_times()
            return t.user + t.system + t.children_user + t.children_system

        def measure(weed: Any, action: Any) -> tuple[float, float, float]:
            c0, s0, w0 = cpu(), server_cpu(weed), time.perf_counter()
            action()
            wall = time.perf_counter() - w0
            time.sleep(0.3)  # let the server finish its write-behind
            return cpu() - c0, server_cpu(weed) - s0, wall

        # Unmeasured warm-up: a fresh server creates its volumes and buffers on the first writes.
        for _, store, _ in servers:
            store.put_file(path, "warm-up", sha256=known)
            store.get_file("warm-up", work / "back.fits")
        per_gib = 1024 / mib
        for r in range(rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for c, store, weed in order:
                client, server, wall = measure(
                    weed, lambda: store.put_file(path, f"r{r}", sha256=known))  # noqa: B023
                res = out[c.name]
                res["put client"].append(client * per_gib)
                res["put server"].append(server * per_gib)
                res["put wall"].append(wall)
                client, server, _ = measure(
                    weed, lambda: store.get_file(f"r{r}", work / "back.fits"))  # noqa: B023
                res["get client"].append(client * per_gib)
                res["get server"].append(server * per_gib)
                if small:
                    _, server, _ = measure(weed, lambda: [  # noqa: B023
                        store.put_file(little, f"s{r}-{i}") for i in range(small)])  # noqa: B023
                    res["small server ms"].append(server * 1e3 / small)
            log.info("round %d/%d done", r + 1, rounds)
    return out


def format_comparison(results: dict[str, dict[str, list[float]]], configs: list[Config],
                      mib: int, rounds: int, small: int) -> str:
    lines = [f"\nConfigurations compared, {rounds} rounds interleaved: put_file of {mib} MiB "
             "(hash handed in), get_file (verified); core-s per GiB, median [min-max]"
             + (f"; small ms: server core-ms per put_file of a 256 KiB object ({small} a round)"
                if small else "")]
    head = f"  {'configuration':<24} {'put server':>19} {'put client':>19} {'put wall s':>10}" \
           f" {'get server':>18} {'get client':>18}" + (f" {'small ms':>8}" if small else "")
    lines.append(head)

    def cell(values: list[float], width: int) -> str:
        return f"{_median(values):5.2f} [{min(values):5.2f}-{max(values):5.2f}]".rjust(width)

    for c in configs:
        r = results[c.name]
        row = (f"  {c.name:<24} {cell(r['put server'], 19)} {cell(r['put client'], 19)}"
               f" {_median(r['put wall']):10.2f} {cell(r['get server'], 18)}"
               f" {cell(r['get client'], 18)}")
        if small:
            row += f" {_median(r['small server ms']):8.1f}"
        lines.append(row)
    for c in configs:
        what = " ".join([*c.flags, *(f"{k}={v}" for k, v in c.env.items()),
                         *([f"part={c.part_mib} MiB"] if c.part_mib else []),
                         *([f"multipart from {c.threshold_mib} MiB"] if c.threshold_mib else [])])
        lines.append(f"  {c.name}: {what or 'the dev stack as configured'}")
    return "\n".join(lines)


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
    ap.add_argument("--config", action="append", default=[], metavar="'NAME: TOKENS'",
                    help="a configuration to compare (repeatable; see the module doc); without "
                         "it, the ways of storing are compared on the dev stack's server")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the --config comparison")
    ap.add_argument("--small", type=int, default=20,
                    help="small (256 KiB) objects stored per round and configuration (0: none)")
    ap.add_argument("--no-compression", action="store_true", help="skip the RICE_1 part")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="with --config: write each server's CPU profile to DIR and print where "
                         "its CPU went (bench/weed_profile.py)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    configs = [Config(spec) for spec in args.config]
    if len({c.name for c in configs}) != len(configs):
        ap.error("--config names must differ")
    reference = machine_reference()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="iris-bench-storage-") as tmp:
        if configs:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            results = compare_configs(Path(tmp), args.mib, configs, args.rounds, args.small,
                                      args.profile)
        else:
            costs = store_costs(Path(tmp), args.mib)
    if configs:
        print(format_comparison(results, configs, args.mib, args.rounds, args.small))
        if args.profile:
            from weed_profile import format_summary

            for i, c in enumerate(configs):
                print(f"\nweed CPU profile of {c.name!r} (its whole run: warm-up, puts, gets):")
                print(format_summary(args.profile / f"{i}.prof"))
        server = _median(results[configs[0].name]["put server"])
    else:
        print(f"\nStoring a {args.mib} MiB file in SeaweedFS on this machine, core-seconds per "
              "GiB (best of 3):")
        for name, c in costs.items():
            print(f"  {name:<32} client {c['client']:5.2f}   server {c['server']:5.2f}")
        server = min(c["server"] for c in costs.values())
    if args.no_compression:
        print(format_reference(reference))
        print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
              f" on {os.cpu_count()} cores")
        return 0
    packed = compression(args.size)
    saved = 1.0 - 1.0 / packed["ratio"]
    print(f"\nRICE_1 tile compression of a simulated {args.size}² UTR raw ramp "
          f"({packed['mib']:.0f} MiB, lossless: {packed['lossless']}): ratio {packed['ratio']:.2f}, "
          f"compress {packed['compress_s_per_gib']:.2f} core-s/GiB, decompress + compare "
          f"{packed['decompress_s_per_gib']:.2f} core-s/GiB")
    print(f"  per GiB of raw: compressing costs {packed['compress_s_per_gib']:.2f} core-s; it "
          f"saves {saved:.0%} of the bytes, i.e. ~{saved * server:.2f} core-s of this server "
          f"(on the same cores) and none where the store runs elsewhere")
    print(format_reference(reference))
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
