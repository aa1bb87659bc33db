#!/usr/bin/env python3
"""kiln's device agent: the few things that must happen *on* the target.

This file is copied to each device and run by the device's own python3, so it
must stay a single file, import only the standard library at module level, and
keep to Python 3.6 syntax (JetPack 4 ships Python 3.6). numpy and onnxruntime
are imported only by the subcommands that need them. Every subcommand prints one
JSON object on its last stdout line; progress goes to stderr.

The controller imports it too (`compare_outputs`, `save_arrays`), so the
comparison that verifies an engine on a device is the very one that checks ONNX
Runtime against PyTorch at export.
"""
import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
import zipfile

FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_arrays(path, arrays):
    """Write named numpy arrays as an .npz whose bytes depend only on the arrays."""
    import numpy as np
    tmp = path + ".part"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=FIXED_ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    os.replace(tmp, path)


def load_arrays(path):
    import numpy as np
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _match_rows(ref, got, rtol, atol):
    """Pair each reference row with an equal got row; returns the permutation or None."""
    import numpy as np
    free = np.ones(len(got), dtype=bool)
    perm = []
    for row in ref:
        close = np.all(np.abs(got - row) <= atol + rtol * np.abs(row), axis=1) & free
        hits = np.flatnonzero(close)
        if not len(hits):
            return None
        perm.append(hits[0])
        free[hits[0]] = False
    return perm


def compare_outputs(reference, actual, rtol, atol, rows_may_permute=True):
    """Compare named outputs. Returns a report dict with "ok", "max_abs_diff", "permuted".

    Detection heads select their top-k queries by score; where scores tie, two
    correct runtimes may emit the same rows in another order. With
    `rows_may_permute`, outputs sharing a leading (batch, rows) shape are
    compared as a set of rows (each row's values across all those outputs
    together), so a permutation passes but any changed value still fails.
    """
    import numpy as np
    missing = sorted(set(reference) - set(actual))
    if missing:
        return {"ok": False, "reason": "missing outputs: " + ", ".join(missing)}
    report = {"ok": True, "max_abs_diff": {}, "permuted": False}
    bad = []
    for name in sorted(reference):
        ref, got = np.asarray(reference[name]), np.asarray(actual[name])
        if ref.shape != got.shape:
            return {"ok": False, "reason": "output %s has shape %s, expected %s" % (name, got.shape, ref.shape)}
        diff = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
        report["max_abs_diff"][name] = diff
        if not np.allclose(got, ref, rtol=rtol, atol=atol):
            bad.append(name)
    if not bad:
        return report
    if rows_may_permute:
        lead = reference[bad[0]].shape[:2]
        group = [n for n in sorted(reference) if reference[n].ndim >= 2 and reference[n].shape[:2] == lead]
        if set(bad) <= set(group):
            ok = True
            for b in range(lead[0]):
                ref_rows = np.concatenate([np.asarray(reference[n][b], np.float64).reshape(lead[1], -1) for n in group], axis=1)
                got_rows = np.concatenate([np.asarray(actual[n][b], np.float64).reshape(lead[1], -1) for n in group], axis=1)
                if _match_rows(ref_rows, got_rows, rtol, atol) is None:
                    ok = False
                    break
            if ok:
                report["permuted"] = True
                return report
    report["ok"] = False
    report["reason"] = "outputs differ from the reference beyond rtol=%g atol=%g: %s" % (
        rtol, atol, ", ".join("%s (max abs diff %.3g)" % (n, report["max_abs_diff"][n]) for n in bad))
    return report


# -- ONNX Runtime engines ----------------------------------------------------------

ORT_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_build(onnx_path, out_path, level, root=None):
    """Optimise the model for this CPU and save the result: that file is the engine."""
    out_path = _checked(root, out_path, "build into")
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    so.log_severity_level = 3  # the hardware-specific warning is the point, not news
    tmp = out_path + ".part"
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a stale temp file, or a link planted there: not written through
    so.optimized_model_filepath = tmp
    start = time.time()
    ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    if not os.path.exists(tmp):
        raise SystemExit("onnxruntime wrote no optimised model")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return {"seconds": time.time() - start, "onnxruntime": ort.__version__, "sha256": sha256_of(out_path),
            "size": os.path.getsize(out_path)}


def ort_verify(engine_path, reference_path, rtol, atol, rows_may_permute, runs=5):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised
    so.log_severity_level = 3
    session = ort.InferenceSession(engine_path, so, providers=["CPUExecutionProvider"])
    ref = load_arrays(reference_path)
    feeds = {k[len("input."):]: v for k, v in ref.items() if k.startswith("input.")}
    expected = {k[len("output."):]: v for k, v in ref.items() if k.startswith("output.")}
    names = [o.name for o in session.get_outputs()]
    latencies = []
    outputs = None
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        outputs = session.run(names, feeds)
        latencies.append((time.perf_counter() - t) * 1000)
    report = compare_outputs(expected, dict(zip(names, outputs)), rtol, atol, rows_may_permute)
    lat = np.sort(np.array(latencies))
    report["latency_ms"] = {"median": float(np.median(lat)), "p90": float(np.percentile(lat, 90)),
                            "p99": float(np.percentile(lat, 99))}
    return report


# -- TensorRT engines (trtexec runs them; the agent feeds and checks) ---------------------
#
# trtexec's own formats (docs/trtexec.md §6; NVIDIA/TensorRT, same in tags 8.5.2, v8.6.1, v10.3.0 and v10.16):
# * --loadInputs=name:file[,name:file]: each file is the raw bytes of one input tensor in the
#   engine's input type, C order (samples/trtexec/README.md "Using custom input data":
#   `np.ones((1,3,244,244), dtype=np.float32).tofile("data.bin")`); the size must be the
#   binding's (samples/common/sampleUtils.cpp `loadFromFile`).
# * --exportOutput=file.json (samples/common/sampleReporting.cpp `exportJSONOutput`):
#     [
#       { "name" : "logits"
#       , "dimensions" : "1x300x80"
#       , "values" : [ 0.0435101, 0.0340782, ... ]
#       }
#     , { "name" : ...
#     ]
#   "dimensions" is a string: the dims joined by "x" (sampleOptions.h operator<<(Dims); ""
#   for a scalar); "values" are flat in C order, printed by `std::ostream <<` with its
#   default 6 significant digits (so tolerances below ~1e-5 relative are meaningless);
#   fp16 as float, int8 as int, bool as 0/1; non-finite values come out as `nan`/`inf`,
#   which is not JSON, hence _NONFINITE.
TRT_OUTPUTS_FILE = "outputs.json"
_NONFINITE = re.compile(r"(?<=[\[,\s])(-?)(nan|inf(?:inity)?)(?=[\s,\]])", re.IGNORECASE)


def raw_inputs(reference_path, out_dir, int64_as_int32=False, root=None):
    """Write each `input.<name>` of the reference as a raw little-endian .bin for --loadInputs.

    float64 becomes float32 (TensorRT has no double I/O). int64 inputs are INT64 bindings
    from TensorRT 10.0 on (kINT64 is new in v10.0.0 include/NvInferRuntimeBase.h) but INT32
    before: `int64_as_int32` converts them (kiln's own references are float32 only).
    """
    import numpy as np
    out_dir = _checked(root, out_dir, "write the raw inputs to")
    ref = load_arrays(reference_path)
    names = sorted(k[len("input."):] for k in ref if k.startswith("input."))
    if not names:
        raise SystemExit("%s holds no input.* arrays" % reference_path)
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    files, spec, inputs, shapes = {}, [], [], {}
    for i, name in enumerate(names):
        a = np.asarray(ref["input." + name])
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        elif a.dtype == np.int64 and int64_as_int32:
            if a.size and (a.min() < -2 ** 31 or a.max() >= 2 ** 31):
                raise SystemExit("input %s has int64 values outside the int32 range" % name)
            a = a.astype(np.int32)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        file_name = "input%d.bin" % i
        path = os.path.join(out_dir, file_name)
        with _new_file(path + ".part") as f:
            f.write(a.tobytes(order="C"))
        os.replace(path + ".part", path)
        files[name] = file_name
        shapes[name] = [int(d) for d in a.shape]
        inputs.append({"name": name, "file": path, "dtype": str(a.dtype), "shape": shapes[name],
                       "bytes": int(a.nbytes)})
        # trtexec splits on the last ':' unless the name is quoted ('name':file)
        spec.append(("'%s':%s" if ":" in path else "%s:%s") % (name, path))
    return {"files": files, "shapes": shapes, "inputs": inputs, "load_inputs": spec}


def _trt_dims(value, name):
    if isinstance(value, list):
        return tuple(int(d) for d in value)
    text = str(value).strip()
    if text.startswith("(") and text.endswith(")"):          # samplesCommon's "(1, 300, 4)" form
        text = text[1:-1].replace(",", "x").replace(" ", "")
    if not text:
        return ()
    try:
        return tuple(int(d) for d in text.split("x"))
    except ValueError:
        raise ValueError("output %s has unreadable dimensions %r" % (name, value))


def parse_trt_outputs(text):
    """trtexec --exportOutput JSON -> {name: numpy array shaped by its "dimensions"}."""
    import numpy as np
    try:
        data = json.loads(text)
    except ValueError:
        data = json.loads(_NONFINITE.sub(lambda m: "NaN" if m.group(2).lower() == "nan"
                                         else m.group(1) + "Infinity", text))
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of outputs, got %s" % type(data).__name__)
    out = {}
    for entry in data:
        if not isinstance(entry, dict) or "name" not in entry or "values" not in entry:
            raise ValueError("an entry lacks name/values: %r" % (str(entry)[:200],))
        name = str(entry["name"])
        dims = _trt_dims(entry.get("dimensions", ""), name)
        values = np.asarray(entry["values"], dtype=np.float64)
        count = 1
        for d in dims:
            count *= d
        if values.size != count:
            raise ValueError("output %s has %d values for dimensions %s" % (name, values.size, "x".join(map(str, dims))))
        out[name] = values.reshape(dims)
    return out


def trt_compare(reference_path, outputs_path, rtol, atol, rows_may_permute):
    """Compare trtexec's exported outputs with the reference outputs (compare_outputs)."""
    ref = load_arrays(reference_path)
    expected = {k[len("output."):]: v for k, v in ref.items() if k.startswith("output.")}
    try:
        with open(outputs_path) as f:
            got = parse_trt_outputs(f.read())
    except (OSError, ValueError) as exc:
        return {"ok": False, "reason": "cannot read trtexec's exported outputs %s: %s" % (outputs_path, exc),
                "rtol": rtol, "atol": atol}
    report = compare_outputs(expected, got, rtol, atol, rows_may_permute)
    report["rtol"], report["atol"] = rtol, atol
    report["outputs"] = {n: list(got[n].shape) for n in sorted(got)}
    return report


# -- staying inside the install_dir ---------------------------------------------------
#
# Every path a subcommand writes or deletes is checked against the install_dir given as
# --root: it must lie under it, and no folder on the way (nor the path itself) may be a
# symlink that leads out of it. Symlinks that stay inside are fine (`current` ->
# releases/<key>). The check resolves the path once and the subcommand then uses the
# resolved form, so what was checked is what is used. (It does not defend against a
# process racing to swap a folder for a link between the check and the write.)

class Escape(SystemExit):
    pass


def _within(path, real_root):
    return path == real_root or path.startswith(real_root.rstrip("/") + "/")


def inside(root, path, what="write"):
    """`path` resolved (symlinks followed only while they stay under `root`); refuses otherwise."""
    if not root:
        raise Escape("refusing to %s %s: no install_dir (--root) given" % (what, path))
    real_root = os.path.realpath(root)
    full = os.path.abspath(path)
    base = None
    for r in (os.path.abspath(root), real_root):
        if _within(full, r):
            base = r
            break
    if base is None:
        raise Escape("refusing to %s %s: it is outside the install_dir %s" % (what, path, root))
    rest = full[len(base):].strip("/")
    cur = real_root
    for part in rest.split("/") if rest else []:
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            resolved = os.path.realpath(nxt)
            if not _within(resolved, real_root):
                raise Escape("refusing to %s %s: %s is a symlink to %s (%s), outside the install_dir %s"
                             % (what, path, nxt, os.readlink(nxt), resolved, root))
            nxt = resolved
        cur = nxt
    return cur


def _checked(root, path, what):
    """inside() when a root is given. The command line always gives one (--root is required
    for every subcommand that writes); only in-process callers (tests, the controller's own
    files) may leave it out."""
    return path if root is None else inside(root, path, what)


def _new_file(path):
    """A new file at `path` for writing; whatever was at that name (a link too) is replaced,
    never written through."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def _entry_inside(root, folder, name, what):
    """`folder`/`name` where `folder` is already resolved inside root: the entry itself is
    not followed (a symlink entry is returned as is, to be unlinked, never recursed into)."""
    if name in ("", ".", "..") or "/" in name:
        raise Escape("refusing to %s %r in %s: not a plain name" % (what, name, folder))
    return os.path.join(folder, name)


# -- transfers through presigned URLs (the device holds no store credentials) ------------

def read_url(stream=None):
    """The presigned URL, from the first line of stdin: a URL is a credential, and argv
    and the environment are visible to other processes (ps, /proc/<pid>/environ)."""
    line = (stream or sys.stdin).readline().strip()
    if not line:
        raise SystemExit("expected the presigned URL on the first line of stdin")
    return line


def fetch(url, out, sha256, timeout=600, root=None):
    """Download to a temp name, verify the sha256, then rename: never a partial file."""
    import urllib.request
    out = _checked(root, out, "download to")
    tmp = "%s.%d.part" % (out, os.getpid())
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, _new_file(tmp) as f:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != sha256:
            raise SystemExit("downloaded bytes do not match sha256 %s (got %s)" % (sha256, h.hexdigest()))
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"sha256": sha256, "size": os.path.getsize(out)}


def upload(url, path, timeout=600):
    import urllib.request
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        req = urllib.request.Request(url, data=f, method="PUT", headers={
            "Content-Length": str(size), "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
    return {"sha256": sha256_of(path), "size": size}


# -- releases -----------------------------------------------------------------------

def activate(model_dir, release, root):
    """Point `current` at releases/<release> atomically; remember the old one as `previous`."""
    model_dir = inside(root, model_dir, "activate a release in")
    releases = inside(root, os.path.join(model_dir, "releases"), "activate a release from")
    staged = inside(root, _entry_inside(root, releases, release, "activate"), "activate")
    current = os.path.join(model_dir, "current")
    target = os.path.join("releases", release)
    if not os.path.isdir(staged):
        raise SystemExit("release %s is not staged in %s" % (release, model_dir))
    old = os.readlink(current) if os.path.islink(current) else None
    if old != target:
        if old:
            _swap_link(model_dir, "previous", old)
        _swap_link(model_dir, "current", target)
    return {"active": release, "previous": os.path.basename(old) if old else None}


def _swap_link(model_dir, name, target):
    tmp = os.path.join(model_dir, ".%s.%d.tmp" % (name, os.getpid()))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, os.path.join(model_dir, name))  # atomic replace of the link
    fd = os.open(model_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rollback(model_dir, root):
    """Make `previous` current again (or deactivate if there was none)."""
    model_dir = inside(root, model_dir, "roll back in")
    prev = os.path.join(model_dir, "previous")
    if os.path.islink(prev):
        target = os.readlink(prev)
        _swap_link(model_dir, "current", target)
        os.unlink(prev)
        return {"active": os.path.basename(target)}
    current = os.path.join(model_dir, "current")
    if os.path.lexists(current):
        os.unlink(current)
    return {"active": None}


def prune(model_dir, keep, root):
    """Remove releases other than current, previous and `keep`; and stale staging folders.
    A release that is a symlink loses its link; what it points at is never touched."""
    model_dir = inside(root, model_dir, "prune")
    releases = inside(root, os.path.join(model_dir, "releases"), "prune")
    wanted = set(keep)
    for link in ("current", "previous"):
        p = os.path.join(model_dir, link)
        if os.path.islink(p):
            wanted.add(os.path.basename(os.readlink(p)))
    removed = []
    for name in sorted(os.listdir(releases)) if os.path.isdir(releases) else []:
        if name not in wanted:
            _remove(_entry_inside(root, releases, name, "prune"))
            removed.append(name)
    return {"removed": removed}


def _remove(path):
    """Delete a folder, file or symlink; a symlink is unlinked, never followed."""
    import shutil
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)  # does not follow symlinks inside it either


def state(install_dir, models):
    """Which release each model has active."""
    out = {}
    for m in models:
        link = os.path.join(install_dir, m, "current")
        out[m] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    return {"active": out}


def _has_numpy():
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(prog="kiln-agent")
    sub = p.add_subparsers(dest="cmd")
    # subcommands that write or delete take the install_dir as --root and stay inside it
    def writer(name, required=True):
        s = sub.add_parser(name)
        s.add_argument("--root", required=required, help="the install_dir: nothing outside it is written")
        return s
    s = sub.add_parser("sha256"); s.add_argument("path")
    s = writer("ort-build"); s.add_argument("--onnx", required=True); s.add_argument("--out", required=True)
    s.add_argument("--level", default="all", choices=sorted(ORT_LEVELS))
    s = sub.add_parser("ort-verify"); s.add_argument("--engine", required=True); s.add_argument("--reference", required=True)
    s.add_argument("--rtol", type=float, default=1e-3); s.add_argument("--atol", type=float, default=1e-4)
    s.add_argument("--strict-order", action="store_true"); s.add_argument("--runs", type=int, default=5)
    # --root optional here only until tests/test_agent_trt.py passes it (kiln always does)
    s = writer("raw-inputs"); s.add_argument("--reference", required=True); s.add_argument("--out-dir", required=True)
    s.add_argument("--int64-as-int32", action="store_true")
    s = sub.add_parser("trt-compare"); s.add_argument("--reference", required=True); s.add_argument("--outputs", required=True)
    s.add_argument("--rtol", type=float, default=1e-2); s.add_argument("--atol", type=float, default=1e-2)
    s.add_argument("--strict-order", action="store_true")
    # presigned URLs are credentials: they come on stdin (first line), never in argv or the
    # environment (ps, /proc/<pid>/cmdline and environ, sshd logs)
    s = writer("fetch"); s.add_argument("--out", required=True); s.add_argument("--sha256", required=True)
    s = sub.add_parser("upload"); s.add_argument("--file", required=True)
    s = writer("activate"); s.add_argument("--model-dir", required=True); s.add_argument("--release", required=True)
    s = writer("rollback"); s.add_argument("--model-dir", required=True)
    s = writer("prune"); s.add_argument("--model-dir", required=True); s.add_argument("--keep", action="append", default=[])
    s = sub.add_parser("state"); s.add_argument("--install-dir", required=True); s.add_argument("models", nargs="*")
    a = p.parse_args(argv)
    if a.cmd == "sha256":
        out = {"sha256": sha256_of(a.path)}
    elif a.cmd == "ort-build":
        out = ort_build(a.onnx, a.out, a.level, a.root)
    elif a.cmd == "ort-verify":
        out = ort_verify(a.engine, a.reference, a.rtol, a.atol, not a.strict_order, a.runs)
    elif a.cmd in ("raw-inputs", "trt-compare") and not _has_numpy():
        out = {"ok": False, "reason": "the device's %s has no numpy (needed to check TensorRT outputs); "
               "install it (apt install python3-numpy) or point the target's `python` at one that has it"
               % sys.executable}
    elif a.cmd == "raw-inputs":
        out = raw_inputs(a.reference, a.out_dir, a.int64_as_int32, a.root)
    elif a.cmd == "trt-compare":
        out = trt_compare(a.reference, a.outputs, a.rtol, a.atol, not a.strict_order)
    elif a.cmd == "fetch":
        out = fetch(read_url(), a.out, a.sha256, root=a.root)
    elif a.cmd == "upload":
        out = upload(read_url(), a.file)
    elif a.cmd == "activate":
        out = activate(a.model_dir, a.release, a.root)
    elif a.cmd == "rollback":
        out = rollback(a.model_dir, a.root)
    elif a.cmd == "prune":
        out = prune(a.model_dir, a.keep, a.root)
    elif a.cmd == "state":
        out = state(a.install_dir, a.models)
    else:
        p.error("missing subcommand")
    print(json.dumps(out, sort_keys=True))
    return 0 if out.get("ok", True) else 3


if __name__ == "__main__":
    sys.exit(main())
