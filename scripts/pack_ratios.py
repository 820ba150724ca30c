"""Compression ratio of `mertools pack` per projection type, on the fixtures (one run; prints a Markdown table).

For every fixture: extract, then compress the expert projections of each type on their own with pack's compressor
(same level, threads and long-distance matching), and pack the whole folder. Ratios are bytes in / bytes out.

    .venv/bin/python scripts/pack_ratios.py [--level 10] [--no-long]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mer_runtime.manifest import load_manifest  # noqa: E402

from mertools import extract  # noqa: E402
from mertools.pack import compressor, pack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--level", type=int, default=10)
    ap.add_argument("--no-long", action="store_true")
    a = ap.parse_args()
    fixtures = sorted((ROOT / "fixtures/real").glob("*.gguf")) + sorted(
        p for p in (ROOT / "fixtures/generated").glob("moe-*.gguf") if "-of-" not in p.name)
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in fixtures:
            out = Path(tmp) / src.stem
            extract(src, out, fsync=False)
            m = load_manifest(out)
            blobs: dict[str, bytearray] = defaultdict(bytearray)
            for e in m.experts:
                data = m.path_of(e).read_bytes()
                for t in e.tensors.values():
                    blobs[t.dtype] += data[t.offset:t.offset + t.nbytes]
            for dtype, b in blobs.items():
                c = compressor(a.level, -1, not a.no_long).compress(bytes(b))
                by_type[dtype][0] += len(b)
                by_type[dtype][1] += len(c)
            r = pack(out, Path(tmp) / f"{src.stem}.tar.zst", level=a.level, long=not a.no_long, fsync=False)
            rows.append((src.name, r.bytes_in, r.bytes_out, r.ratio))
    print("| projection type | bytes | compressed | ratio |\n|---|---|---|---|")
    for dtype, (n, c) in sorted(by_type.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
        print(f"| {dtype} | {n} | {c} | {n / c:.3f} |")
    print("\n| fixture folder | bytes | archive | ratio |\n|---|---|---|---|")
    for name, n, c, r in rows:
        print(f"| {name} | {n} | {c} | {r:.3f} |")


if __name__ == "__main__":
    main()
