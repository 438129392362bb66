"""Listing a Places2 tar archive on S3: requests per archive before and after, projected to the real archive.

    .venv/bin/python bench/tar_listing.py [--members 400] [--member-kib 58] [--latency-ms 20]

Builds a Places-like archive (``--members`` incompressible members of ``--member-kib`` KiB) on a moto S3 server
on 127.0.0.1, lists it the old way (``tarfile`` seeking from header to header on a 64 KiB-block file: one range
request per header or two) and the new way (:func:`pipeline.data.sources.scan_tar`: one sequential pass in
64 MiB requests), counts the GET requests each sends, and projects both to Places365-Standard's
``train_large_places365standard.tar`` (1.8 M members of ~58 KB, 105 GB) at ``--latency-ms`` per request.
Request latency is what the projection counts: both ways transfer about the whole archive once, the old way in
~900,000 sequential round trips. The cached index (``<archive>.index.tsv.gz``) makes every later listing one GET.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import socket
import sys
import tarfile
import time

# Run as a script, this file's folder leads sys.path and its name would shadow the ``models`` package (which
# pipeline.data.imageops imports for the format allow-list).
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH_DIR]

from pipeline.data.sources import TAR_LIST_BLOCK, scan_tar  # noqa: E402
from pipeline.fsutil import url_to_fs  # noqa: E402

PLACES2_MEMBERS = 1_803_460
PLACES2_BYTES = 105 * 10**9
OLD_INDEX_BLOCK = 64 * 1024  # what listing used before: small blocks so that seeks skip member data


def _archive(members: int, member_bytes: int) -> bytes:
    rng = random.Random(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for number in range(members):
            info = tarfile.TarInfo(f"data_large/a/abbey/{number:08d}.jpg")
            info.size = member_bytes
            archive.addfile(info, io.BytesIO(rng.randbytes(member_bytes)))
    return buffer.getvalue()


def _old_listing(fs, path: str) -> int:
    """The previous listing: seekable ``tarfile`` over a small-block file, one header after the other."""
    count = 0
    with fs.open(path, "rb", block_size=OLD_INDEX_BLOCK) as handle:
        archive = tarfile.open(fileobj=handle, mode="r:")
        while (member := archive.next()) is not None:
            archive.members = []
            count += member.isfile()
    return count


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=400)
    parser.add_argument("--member-kib", type=int, default=58)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args(argv)

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[name] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        url = "s3://bench/raw/train_large.tar"
        fs, path = url_to_fs(url, options)
        fs.mkdir("bench")
        data = _archive(args.members, args.member_kib * 1024)
        fs.pipe_file(path, data)
        fs.connect()
        gets = {"n": 0}
        fs.s3.meta.events.register("before-call.s3.GetObject", lambda **_: gets.__setitem__("n", gets["n"] + 1))

        results = {}
        for name, listing in (("before: header by header, 64 KiB blocks", lambda: _old_listing(fs, path)),
                              (f"after: one pass, {TAR_LIST_BLOCK >> 20} MiB blocks", lambda: len(scan_tar(url, options)))):
            gets["n"] = 0
            fs.invalidate_cache()
            started = time.perf_counter()
            members = listing()
            results[name] = (members, gets["n"], time.perf_counter() - started)
    finally:
        server.stop()

    print(f"archive: {args.members} members of {args.member_kib} KiB, {len(data) / 2**20:.1f} MiB, on moto S3 (loopback)")
    print(f"{'listing':<44}{'members':>9}{'GETs':>7}{'s here':>8}   projected Places2 train archive "
          f"(1.8 M members, 105 GB) at {args.latency_ms:g} ms/request")
    latency = args.latency_ms / 1000
    projected = {}
    for name, (members, requests, seconds) in results.items():
        if name.startswith("before"):
            total = requests / args.members * PLACES2_MEMBERS  # one request per header or two: scales with members
        else:
            total = math.ceil(PLACES2_BYTES / TAR_LIST_BLOCK)  # one request per block: scales with bytes
        projected[name] = total * latency
        print(f"{name:<44}{members:>9}{requests:>7}{seconds:>8.2f}   {total:>11,.0f} requests = "
              f"{_duration(total * latency)}")
    before, after = projected.values()
    print(f"ratio before/after (request latency): {before / after:,.0f}x; a cached index lists it in 1 GET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
