"""Large-model layout: memory and time of packing an ONNX whose weights lie beside it (as torch
writes a model over 2 GB: one file per tensor) into enginekiln's one data file, and of hashing it.

    .venv/bin/python bench/bench_external_data.py [--mib 512] [--tensors 8]

Prints the peak resident memory of the process that packs and hashes (a fresh subprocess, so its
baseline is only Python + onnx), against the size of the weights: streaming keeps it far below.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MAKE = r"""
import sys, numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
folder, mib, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
side = int((mib * 2**20 / n / 4) ** 0.5)
inits, nodes, prev = [], [], "x"
for i in range(n):
    w = np.full((side, side), 1.0 / side, np.float32)
    inits.append(numpy_helper.from_array(w, f"w{i}"))
    nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
    prev = f"y{i}"
g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                      [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, side])], inits)
import os; os.chdir(folder)
onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "model.onnx",
                save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
"""

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
from kiln.onnx_external import pack_external_data
from kiln.keys import HashCache
src, out = Path(sys.argv[1]), Path(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
graph, data = pack_external_data(src, out)
t1 = time.time()
cache = HashCache(out / "hashes.json")
cache.sha256(graph); cache.sha256(out / data.location)
t2 = time.time()
again = HashCache(out / "hashes.json")
again.sha256(graph); again.sha256(out / data.location)
print(json.dumps({"data_bytes": data.size, "pack_s": t1 - t0, "hash_s": t2 - t1, "noop_bytes_hashed": again.bytes_read,
                  "rss_before_kib": base, "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--tensors", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ext-") as tmp:
        src = Path(tmp) / "exported"
        src.mkdir()
        subprocess.run([sys.executable, "-c", MAKE, str(src), str(args.mib), str(args.tensors)], check=True)
        proc = subprocess.run([sys.executable, "-c", MEASURE, str(src / "model.onnx"), str(Path(tmp) / "packed")],
                              check=True, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        r = json.loads(proc.stdout)
    mib = r["data_bytes"] / 2**20
    print(f"weights {mib:.0f} MiB in {args.tensors} tensor files -> one data file")
    print(f"pack {r['pack_s']:.2f} s ({mib / r['pack_s']:.0f} MiB/s), hash {r['hash_s']:.2f} s")
    print(f"peak RSS {r['rss_peak_kib'] / 1024:.0f} MiB (before packing {r['rss_before_kib'] / 1024:.0f} MiB): "
          f"{(r['rss_peak_kib'] - r['rss_before_kib']) / 1024:.0f} MiB more for {mib:.0f} MiB of weights")
    print(f"no-op re-hash through the stat cache: {r['noop_bytes_hashed']} bytes hashed")


if __name__ == "__main__":
    main()
