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
import struct
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


POINT_ORDER = ("min", "opt", "max")


def reference_points(ref):
    """The shape points of a reference: [(point, inputs, outputs)], point None for a static model's
    `input.<name>`/`output.<name>` arrays, else min, opt, max from `point.<p>.input.<name>` and
    `point.<p>.output.<name>` (kiln/pipeline/export.py `reference_arrays`)."""
    def split(arrays):
        feeds = dict((k[len("input."):], v) for k, v in arrays.items() if k.startswith("input."))
        expected = dict((k[len("output."):], v) for k, v in arrays.items() if k.startswith("output."))
        return feeds, expected
    grouped = {}
    for k, v in ref.items():
        if k.startswith("point."):
            point, _, rest = k[len("point."):].partition(".")
            grouped.setdefault(point, {})[rest] = v
    if not grouped:
        feeds, expected = split(ref)
        return [(None, feeds, expected)]
    order = [p for p in POINT_ORDER if p in grouped] + sorted(p for p in grouped if p not in POINT_ORDER)
    return [(p,) + split(grouped[p]) for p in order]


def _shapes_text(feeds):
    return ", ".join("%s=%s" % (k, "x".join(str(d) for d in v.shape)) for k, v in sorted(feeds.items()))


def merge_reports(reports):
    """One report for several shape points [(point, report)]: ok only if every point is; the
    largest difference per output; the first failure's reason, naming its point."""
    merged = {"ok": True, "max_abs_diff": {}, "permuted": False}
    if len(reports) > 1 or reports[0][0] is not None:
        merged["points"] = dict((p, r) for p, r in reports)
    for point, report in reports:
        for name, diff in report.get("max_abs_diff", {}).items():
            merged["max_abs_diff"][name] = max(diff, merged["max_abs_diff"].get(name, 0.0))
        merged["permuted"] = merged["permuted"] or report.get("permuted", False)
        if not report.get("ok") and merged["ok"]:
            merged["ok"] = False
            merged["reason"] = report.get("reason") if point is None else "at %s (%s): %s" % (
                point, report.get("shapes", "?"), report.get("reason"))
    return merged


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


#: larger than any initializer: with it, ONNX Runtime writes every initializer into the optimised model
INLINE_ALL = str(1 << 62)


def ort_build(onnx_path, out_path, level, root=None, inline_weights=False):
    """Optimise the model for this CPU and save the result: that file is the engine.

    `inline_weights` (an ONNX with external data): ONNX Runtime's optimised model would keep
    pointing at the ONNX's data file for the initializers it left unchanged; saving "with external
    initializers" above a size no tensor reaches writes them all into the engine instead (one
    self-contained file; a protobuf, so at most 2 GB)."""
    out_path = _checked(root, out_path, "build into")
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    so.log_severity_level = 3  # the hardware-specific warning is the point, not news
    if inline_weights:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    os.path.basename(out_path) + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", INLINE_ALL)
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
    names = [o.name for o in session.get_outputs()]
    reports, latencies = [], []
    # a dynamic model's reference holds min, opt and max: every point is checked, opt is timed
    for point, feeds, expected in reference_points(load_arrays(reference_path)):
        timed = point in (None, "opt")
        outputs = None
        for _ in range(max(1, runs) if timed else 1):
            t = time.perf_counter()
            try:
                outputs = session.run(names, feeds)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
                reports.append((point, {"ok": False, "shapes": _shapes_text(feeds),
                                        "reason": "ONNX Runtime cannot run the engine: %s" % exc}))
                break
            if timed:
                latencies.append((time.perf_counter() - t) * 1000)
        else:
            one = compare_outputs(expected, dict(zip(names, outputs)), rtol, atol, rows_may_permute)
            one["shapes"] = _shapes_text(feeds)
            reports.append((point, one))
    report = merge_reports(reports)
    lat = np.sort(np.array(latencies or [0.0]))
    report["latency_ms"] = {"median": float(np.median(lat)), "p90": float(np.percentile(lat, 90)),
                            "p99": float(np.percentile(lat, 99))}
    report["latency_source"] = ("onnxruntime: %d timed InferenceSession.run calls (time.perf_counter), "
                                "numpy median/percentile" % len(latencies))
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
# * --exportTimes=file.json (sampleReporting.cpp `exportJSONTrace`; the same field names in tags
#   8.5.2, v8.6.1, v10.3.0, v10.16 and v11.1): a JSON list, one object per timed iteration,
#     [
#       { "startEnqMs" : 201.3, "endEnqMs" : 201.4, "startH2dMs" : ..., "endH2dMs" : ...,
#         "startComputeMs" : ..., "endComputeMs" : ..., "startD2hMs" : ..., "endD2hMs" : ...,
#         "h2dMs" : ..., "computeMs" : ..., "d2hMs" : ..., "latencyMs" : 10.8 }
#     , { ... }
#     ]
#   (one object per line), times in ms from the start of inference, 6 significant digits.
#   latencyMs = h2dMs + computeMs + d2hMs: the "Latency" of the text summary. From 8.5 the
#   warm-up iterations are left out; 8.4 and older export them too, so the same rule as the
#   summary's is applied here (iterations whose compute starts before the warm-up ends are
#   warm-ups; trtexec's default --warmUp is 200 ms, samples/common/sampleOptions.h).
TRT_TIMES_FILE = "times.json"
TRT_DEFAULT_WARMUP_MS = 200.0


def _f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def trtexec_latency(path, warmup_ms=TRT_DEFAULT_WARMUP_MS):
    """{"min", "max", "mean", "median", "p90", "p95", "p99", "iterations", "source"} of the
    latencyMs in trtexec's --exportTimes file, with the summary's own rules (sampleReporting.cpp
    `findMedian`: the middle value or the mean of the two; `findPercentile`: sorted ascending,
    the value at all-1-int((1-p/100)*all), in float32 as trtexec computes it), so the figures
    equal the text summary's. None if the file is absent; ValueError if it is not that format."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(t, dict) and "latencyMs" in t for t in data):
        raise ValueError("not a trtexec --exportTimes list of {..., \"latencyMs\": ...}")
    timed = sorted(float(t["latencyMs"]) for t in data if float(t.get("startComputeMs", warmup_ms)) >= warmup_ms)
    if not timed:
        raise ValueError("no timed iterations (after the %g ms warm-up)" % warmup_ms)
    n, m = len(timed), len(timed) // 2
    out = {"min": timed[0], "max": timed[-1], "mean": sum(timed) / n,
           "median": timed[m] if n % 2 else (timed[m - 1] + timed[m]) / 2, "iterations": n,
           "source": "trtexec --exportTimes"}
    for p in (90, 95, 99):
        exclude = int(_f32(_f32(1 - _f32(_f32(float(p)) / 100)) * n))
        out["p%d" % p] = timed[max(n - 1 - exclude, 0)]
    return out
_NONFINITE = re.compile(r"(?<=[\[,\s])(-?)(nan|inf(?:inity)?)(?=[\s,\]])", re.IGNORECASE)


def raw_inputs(reference_path, out_dir, int64_as_int32=False, root=None):
    """Write each `input.<name>` of the reference as a raw little-endian .bin for --loadInputs.

    A dynamic model's reference (shape points min/opt/max): each point's inputs go to
    `<out_dir>/<point>/`, and the answer is {"points": {point: <the answer below, file names
    relative to that folder>}, "order": [min, opt, max]}. `raw_plan` tells the same names and
    shapes without writing anything (the controller builds the trtexec runs from it).

    float64 becomes float32 (TensorRT has no double I/O). int64 inputs are INT64 bindings
    from TensorRT 10.0 on (kINT64 is new in v10.0.0 include/NvInferRuntimeBase.h) but INT32
    before: `int64_as_int32` converts them (kiln's own references are float32 only).
    """
    out_dir = _checked(root, out_dir, "write the raw inputs to")
    points = reference_points(load_arrays(reference_path))
    if points[0][0] is None:
        return _raw_point(points[0][1], out_dir, int64_as_int32, reference_path)
    return {"points": dict((p, _raw_point(feeds, os.path.join(out_dir, p), int64_as_int32, reference_path))
                           for p, feeds, _ in points), "order": [p for p, _, _ in points]}


def raw_plan(reference_path):
    """What `raw_inputs` writes for this reference, without writing: {"files", "shapes"} (file
    names relative to the folder), or {"points": {point: that}, "order": [...]}."""
    points = reference_points(load_arrays(reference_path))
    if points[0][0] is None:
        return _point_plan(points[0][1], reference_path)
    return {"points": dict((p, _point_plan(feeds, reference_path)) for p, feeds, _ in points),
            "order": [p for p, _, _ in points]}


def _point_plan(ref, reference_path):
    """{"files": {input name: "input<i>.bin"}, "shapes": {input name: [dims]}} in name order."""
    names = sorted(ref)
    if not names:
        raise SystemExit("%s holds no input.* arrays" % reference_path)
    return {"files": dict((name, "input%d.bin" % i) for i, name in enumerate(names)),
            "shapes": dict((name, [int(d) for d in ref[name].shape]) for name in names)}


def _raw_point(ref, out_dir, int64_as_int32, reference_path):
    import numpy as np
    plan = _point_plan(ref, reference_path)
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    spec, inputs = [], []
    for name, file_name in sorted(plan["files"].items()):
        a = np.asarray(ref[name])
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        elif a.dtype == np.int64 and int64_as_int32:
            if a.size and (a.min() < -2 ** 31 or a.max() >= 2 ** 31):
                raise SystemExit("input %s has int64 values outside the int32 range" % name)
            a = a.astype(np.int32)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        path = os.path.join(out_dir, file_name)
        with _new_file(path + ".part") as f:
            f.write(a.tobytes(order="C"))
        os.replace(path + ".part", path)
        inputs.append({"name": name, "file": path, "dtype": str(a.dtype), "shape": plan["shapes"][name],
                       "bytes": int(a.nbytes)})
        # trtexec splits on the last ':' unless the name is quoted ('name':file)
        spec.append(("'%s':%s" if ":" in path else "%s:%s") % (name, path))
    return dict(plan, inputs=inputs, load_inputs=spec)


def run_program(argv, cwd, timeout, root=None):
    """Run a program (a trtexec load, in a batch between `raw-inputs` and `trt-compare`) in `cwd`
    (inside the install_dir: what it writes there stays inside) and answer with its exit code and
    output: ok only if it exited 0. Its output is captured, never mixed into this agent's answer."""
    import subprocess
    cwd = _checked(root, cwd, "run a program in")
    try:
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "exit_code": None, "timed_out": True, "stdout": _text(exc.stdout),
                "stderr": _text(exc.stderr), "reason": "%s did not finish in %g s" % (argv[0], timeout)}
    except OSError as exc:
        return {"ok": False, "exit_code": 127, "stdout": "", "stderr": "%s: %s" % (argv[0], exc),
                "reason": "cannot run %s: %s" % (argv[0], exc)}
    return {"ok": done.returncode == 0, "exit_code": done.returncode, "stdout": _text(done.stdout),
            "stderr": _text(done.stderr)}


def _text(data):
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


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


def trt_compare(reference_path, outputs_path, rtol, atol, rows_may_permute, point=None, times_path=None):
    """Compare trtexec's exported outputs with the reference outputs (compare_outputs); `point`:
    the shape point (min/opt/max) of a dynamic model's reference they were computed at. With
    `times_path` (trtexec's --exportTimes file) the report carries its "latency_ms" when the
    file exists (trtexec_latency)."""
    points = dict((p, expected) for p, _, expected in reference_points(load_arrays(reference_path)))
    if point not in points:
        return {"ok": False, "reason": "the reference holds no shape point %r (it has: %s)" % (
            point, ", ".join(str(p) for p in points)), "rtol": rtol, "atol": atol}
    expected = points[point]
    try:
        with open(outputs_path) as f:
            got = parse_trt_outputs(f.read())
    except (OSError, ValueError) as exc:
        return {"ok": False, "reason": "cannot read trtexec's exported outputs %s: %s" % (outputs_path, exc),
                "rtol": rtol, "atol": atol}
    report = compare_outputs(expected, got, rtol, atol, rows_may_permute)
    report["rtol"], report["atol"] = rtol, atol
    report["outputs"] = {n: list(got[n].shape) for n in sorted(got)}
    if times_path:
        try:
            latency = trtexec_latency(times_path)
        except (OSError, ValueError) as exc:
            report["latency_error"] = "cannot read trtexec's --exportTimes file %s: %s" % (times_path, exc)
        else:
            if latency is not None:
                report["latency_ms"] = latency
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


ESCAPE_EXIT = 77


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


def fetch(url, out, sha256, timeout=600, root=None, if_absent=False):
    """Download to a temp name, verify the sha256, then rename: never a partial file. With
    `if_absent`: its folder is made (inside root), and a file already there with these bytes is
    kept, not downloaded again ("present": true)."""
    import urllib.request
    if if_absent:
        folder = _checked(root, os.path.dirname(os.path.abspath(out)), "download to")
        if not os.path.isdir(folder):
            os.makedirs(folder)
    out = _checked(root, out, "download to")
    if if_absent and os.path.isfile(out) and not os.path.islink(out) and sha256_of(out) == sha256:
        return {"sha256": sha256, "size": os.path.getsize(out), "present": True}
    tmp = "%s.%d.part" % (out, os.getpid())
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            need = int(r.headers.get("Content-Length") or 0)
            free = free_bytes(os.path.dirname(out))
            if need > free:
                raise SystemExit("not enough space: needs %d MB, has %d MB on %s"
                                 % (-(-need // 2 ** 20), free // 2 ** 20, os.path.dirname(out)))
            _download(r, tmp, h)
        if h.hexdigest() != sha256:
            raise SystemExit("downloaded bytes do not match sha256 %s (got %s)" % (sha256, h.hexdigest()))
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"sha256": sha256, "size": os.path.getsize(out)}


def _download(r, tmp, h):
    with _new_file(tmp) as f:
        for chunk in iter(lambda: r.read(1 << 20), b""):
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


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


def rollback(model_dir, root, swap=False):
    """Make `previous` current again (or deactivate if there was none). With `swap` (a rollback
    asked for by a person) the release rolled back from becomes `previous`, so it stays on the
    device and rolling forward needs no new upload."""
    model_dir = inside(root, model_dir, "roll back in")
    prev = os.path.join(model_dir, "previous")
    current = os.path.join(model_dir, "current")
    if os.path.islink(prev):
        target = os.readlink(prev)
        old = os.readlink(current) if os.path.islink(current) else None
        _swap_link(model_dir, "current", target)
        if swap and old and old != target:
            _swap_link(model_dir, "previous", old)
        else:
            os.unlink(prev)
        out = {"active": os.path.basename(target)}
        if swap:
            out["previous"] = os.path.basename(old) if old else None
        return out
    current = os.path.join(model_dir, "current")
    if os.path.lexists(current):
        os.unlink(current)
    return {"active": None}


def deactivate(model_dir, root):
    """No release active for this model any more (it left the target's list): `current` becomes
    `previous`, so a rollback restores it and its files stay until removed."""
    model_dir = inside(root, model_dir, "deactivate a release in")
    current = os.path.join(model_dir, "current")
    if not os.path.islink(current):
        return {"active": None, "previous": None}
    old = os.readlink(current)
    _swap_link(model_dir, "previous", old)
    os.unlink(current)
    _fsync_dir(model_dir)
    return {"active": None, "previous": os.path.basename(old)}


HOLD_FILE = "hold.json"


def hold(model_dir, info, root):
    """Record a hold (a person rolled this model back): deploys keep the active release while
    the wanted engine is the one named in the hold. Written complete (temp + rename)."""
    model_dir = inside(root, model_dir, "hold a release in")
    path = _entry_inside(root, model_dir, HOLD_FILE, "hold")
    tmp = os.path.join(model_dir, ".%s.%d.tmp" % (HOLD_FILE, os.getpid()))
    with open(tmp, "w") as f:
        f.write(json.dumps(info, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(model_dir)
    return {"held": info}


def unhold(model_dir, root):
    """Remove a hold; returns the hold that was removed (None if there was none)."""
    model_dir = inside(root, model_dir, "remove a hold in")
    path = _entry_inside(root, model_dir, HOLD_FILE, "remove a hold in")
    try:
        with open(path) as f:
            old = json.loads(f.read() or "null")
    except (OSError, ValueError):
        old = None
    if os.path.lexists(path):
        os.unlink(path)
        _fsync_dir(model_dir)
    return {"removed": old}


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


# -- staging, removal, copies, free space (every write checked against --root) --------

STAGING_PREFIX = ".staging-"
#: temp files of dead runs (`.<name>.<random>.part`, `<name>.<pid>.part`) older than this are swept
PART_MIN_AGE = 600.0


def free_bytes(path):
    """Free bytes (for an unprivileged user) on the filesystem holding `path` (or its nearest
    existing parent), like `df -Pk`'s Available column."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    st = os.statvfs(p)
    return int(st.f_bavail) * int(st.f_frsize)


def _makedirs(root, path, what):
    """mkdir -p `path` inside root, refusing a folder on the way that is a link leading out."""
    real = inside(root, path, what)
    if not os.path.isdir(real):
        os.makedirs(real)
    return real


def stage_begin(model_dir, release, root):
    """A fresh, empty releases/.staging-<release> (never through a link out of root); staging
    folders left by dead runs (the caller holds the deploy lock) are removed first."""
    releases = _makedirs(root, os.path.join(model_dir, "releases"), "stage a release in")
    staging = _entry_inside(root, releases, STAGING_PREFIX + release, "stage")
    _entry_inside(root, releases, release, "stage")
    removed = []
    for name in sorted(os.listdir(releases)):
        if name.startswith(STAGING_PREFIX):
            _remove(_entry_inside(root, releases, name, "remove"))
            removed.append(name)
    os.mkdir(staging)
    return {"staging": staging, "removed": removed, "free_bytes": free_bytes(staging)}


def stage_commit(model_dir, release, root):
    """releases/.staging-<release> becomes releases/<release> by a rename (complete or absent)."""
    releases = inside(root, os.path.join(model_dir, "releases"), "commit a release in")
    staging = _entry_inside(root, releases, STAGING_PREFIX + release, "commit")
    final = _entry_inside(root, releases, release, "commit")
    if os.path.islink(staging) or not os.path.isdir(staging):
        raise SystemExit("nothing staged for release %s in %s" % (release, releases))
    old = None
    if os.path.lexists(final):  # moved aside (a rename) so the new one appears in one step
        old = os.path.join(releases, ".old-%s.%d" % (release, os.getpid()))
        os.rename(final, old)
    os.rename(staging, final)
    _fsync_dir(releases)
    if old:
        _remove(old)
    return {"release": final}


def remove(path, root):
    """Delete `path` (inside root); the entry itself is never followed (a link is unlinked)."""
    parent = inside(root, os.path.dirname(os.path.abspath(path)), "remove in")
    entry = _entry_inside(root, parent, os.path.basename(os.path.abspath(path)), "remove")
    if not os.path.lexists(entry):
        return {"removed": None}
    _remove(entry)
    return {"removed": entry}


def copy(src, dst, sha256, root, move=False):
    """Copy `src` to `dst` (inside root) through a temp name, verified by sha256, then renamed.
    `move`: `src` (inside root too) is verified by sha256 and renamed to `dst` instead (an engine
    just built on this device goes into its release without a second copy)."""
    parent = inside(root, os.path.dirname(os.path.abspath(dst)), "copy into")
    dst = _entry_inside(root, parent, os.path.basename(os.path.abspath(dst)), "copy to")
    if move:
        src = _entry_inside(root, inside(root, os.path.dirname(os.path.abspath(src)), "move from"),
                            os.path.basename(os.path.abspath(src)), "move")
        got = sha256_of(src)
        if sha256 and got != sha256:
            raise SystemExit("%s does not match sha256 %s (got %s); not moved" % (src, sha256, got))
        if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
            os.unlink(dst)
        os.rename(src, dst)
        return {"sha256": got, "path": dst}
    tmp = "%s.%d.part" % (dst, os.getpid())
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, _new_file(tmp) as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if sha256 and h.hexdigest() != sha256:
            raise SystemExit("%s does not match sha256 %s (got %s); not copied" % (src, sha256, h.hexdigest()))
        if os.path.lexists(dst) and (os.path.islink(dst) or not os.path.isdir(dst)):
            os.unlink(dst)
        os.rename(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return {"sha256": h.hexdigest(), "path": dst}


def write_file(path, data, root):
    """Write `data` (bytes) to `path` inside root: a temp name, fsync, then a rename (a reader
    sees the old file or the whole new one)."""
    parent = inside(root, os.path.dirname(os.path.abspath(path)), "write into")
    path = _entry_inside(root, parent, os.path.basename(os.path.abspath(path)), "write")
    tmp = "%s.%d.part" % (path, os.getpid())
    try:
        with _new_file(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def batch(steps):
    """Run several subcommands in this one process, in order (one SSH command and one python
    start for a phase of a deploy instead of one each). `steps`: [{"argv": [...], "stdin": text}],
    each step's stdin being what it would read from stdin alone (a presigned URL, a lock owner, a
    file's content). Stops after the first step whose answer is not ok; a step that exits (a
    refusal, an error) ends the batch with that exit, as it would end the subcommand alone."""
    results = []
    for i, step in enumerate(steps):
        argv = list(step["argv"])
        if not argv or argv[0] == "batch":
            raise SystemExit("batch step %d: a subcommand (not batch) is required" % i)
        saved = sys.stdin, sys.stdout
        sys.stdin, sys.stdout = io.StringIO(step.get("stdin") or ""), io.StringIO()
        try:
            code = main(argv)
            printed = sys.stdout.getvalue()
        except SystemExit as exc:
            if isinstance(exc, Escape) or not isinstance(exc.code, str):
                raise  # a refusal keeps its exit code; argparse's errors say which step themselves
            raise SystemExit("batch step %d (%s): %s" % (i, argv[0], exc.code))
        finally:
            sys.stdin, sys.stdout = saved
        results.append(json.loads(printed.strip().splitlines()[-1]))
        if code != 0:
            return {"ok": False, "failed": i, "results": results}
    return {"ok": True, "results": results}


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _release_inputs(model_dir):
    """Input file names (in .kiln/inputs) the `current` and `previous` releases of a model used."""
    names, prefixes = set(), set()
    for link in ("current", "previous"):
        try:
            with open(os.path.join(model_dir, link, "manifest.json")) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        names.update(str(n) for n in manifest.get("inputs") or [] if n)
        if manifest.get("onnx_sha256"):
            prefixes.add(str(manifest["onnx_sha256"]) + ".")
    return names, prefixes


#: an engine verified on this device by its build, kept in .kiln/inputs for its deploy to move
#: into the release (kiln.pipeline.engines); one no deploy took is removed like an unused input
VERIFIED_SUFFIX = ".verified-engine"


def clean_inputs(install_dir, models, keep, root, min_age=PART_MIN_AGE, now=None):
    """In .kiln/inputs: remove temp files (`*.part`) of dead runs, engines kept after a build
    that no deploy took (VERIFIED_SUFFIX), and data inputs (.onnx, .onnx.data, .npz)
    that neither `keep` nor the current/previous release of any of `models` uses. Files younger
    than `min_age` are left (a build may be using them right now); scripts (.py) are kept."""
    now = time.time() if now is None else now
    inputs = inside(root, os.path.join(install_dir, ".kiln", "inputs"), "clean")
    if not os.path.isdir(inputs):
        return {"removed": []}
    wanted, prefixes = set(keep), set()
    for m in models:
        n, p = _release_inputs(inside(root, os.path.join(install_dir, m), "read"))
        wanted |= n
        prefixes |= p
    removed = []
    for name in sorted(os.listdir(inputs)):
        path = _entry_inside(root, inputs, name, "clean")
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        if age < min_age or name in wanted or any(name.startswith(p) for p in prefixes):
            continue
        if name.endswith(".part") or name.endswith((".onnx", ".onnx.data", ".npz", VERIFIED_SUFFIX)):
            _remove(path)
            removed.append(name)
    return {"removed": removed}


# -- the deploy lock -------------------------------------------------------------------
#
# `.kiln/lock` is a folder holding `owner` (JSON {owner, token, since, pid, host}). It is
# created complete: the owner is written into a temp folder that is then renamed to the lock
# path (rename does not replace a non-empty folder, so of two takers one wins). A stale lock
# (older than the limit, its owner process gone on the same host, or without a readable owner
# and older than a grace period: a run killed by older code) is first renamed to a unique name
# (only one taker can move it), then the lock is created as above. Only its owner releases it.

def host_id():
    """This machine (and pid namespace): a pid recorded with the same host_id can be probed here."""
    import socket
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return "%s/%s" % (socket.gethostname(), ns)


def _read_owner(lock):
    try:
        with open(os.path.join(lock, "owner")) as f:
            text = f.read()
        held = json.loads(text) if text.strip() else None
        return held if isinstance(held, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def lock_stale(lock, held, stale_after, grace, now=None):
    """Why the lock at `lock` (owner info `held`) is stale, or None if it is alive."""
    now = time.time() if now is None else now
    if held is None:
        try:
            mtime = max(os.lstat(p).st_mtime for p in (lock, os.path.join(lock, "owner")) if os.path.lexists(p))
        except (OSError, ValueError):
            return "it vanished"
        age = now - mtime
        return "it has no owner and is %.0f s old" % age if age >= grace else None
    try:
        age = now - float(held.get("since"))
    except (TypeError, ValueError):
        age = float("inf")
    if age >= stale_after:
        return "it is %.0f s old (limit %.0f s)" % (age, stale_after)
    if held.get("host") and held.get("host") == host_id() and held.get("pid") and not _pid_alive(held["pid"]):
        return "its owner process %s is gone" % held["pid"]
    return None


def lock_take(lock, info, root, stale_after, grace):
    """Take the lock for `info` (a dict with a unique "token"): {"taken": true} or
    {"taken": false, "held": <owner info or null>, "age": seconds}."""
    import random
    parent = _makedirs(root, os.path.dirname(os.path.abspath(lock)), "lock")
    lock = _entry_inside(root, parent, os.path.basename(os.path.abspath(lock)), "lock")
    tag = "%d.%d" % (os.getpid(), random.getrandbits(48))
    for attempt in range(3):
        tmp = os.path.join(parent, ".lock-new.%s" % tag)
        os.mkdir(tmp)
        with _new_file(os.path.join(tmp, "owner")) as f:
            f.write(json.dumps(info, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        try:
            if os.path.islink(lock) or (os.path.lexists(lock) and not os.path.isdir(lock)):
                os.unlink(lock)  # a file or link at the lock's name is no lock
            if os.path.lexists(lock):  # held (or an empty folder of a killed old run: judged below)
                raise OSError("held")
            os.rename(tmp, lock)  # fails if a (non-empty) lock appeared meanwhile
            _fsync_dir(parent)
            return {"taken": True}
        except OSError:
            _remove(tmp)
        held = _read_owner(lock)
        why = lock_stale(lock, held, stale_after, grace)
        if why is None:
            since = (held or {}).get("since")
            try:
                age = time.time() - float(since)
            except (TypeError, ValueError):
                age = None
            return {"taken": False, "held": held, "age": age}
        aside = os.path.join(parent, ".lock-stale.%s.%d" % (tag, attempt))
        try:
            os.rename(lock, aside)  # only one taker moves it; the others retry from the start
        except OSError:
            continue
        moved = _read_owner(aside)
        if (moved or {}).get("token") != (held or {}).get("token") or (held is None and moved is not None):
            # someone took it over between our look and our move: put their fresh lock back
            try:
                os.rename(aside, lock)
            except OSError:
                pass
            continue
        sys.stderr.write("taking over a stale deploy lock (%s): %s\n" % (why, json.dumps(held, sort_keys=True)))
        _remove(aside)
    return {"taken": False, "held": _read_owner(lock), "age": None}


def lock_release(lock, token, root):
    """Remove the lock only if `token` owns it."""
    parent = inside(root, os.path.dirname(os.path.abspath(lock)), "unlock")
    lock = _entry_inside(root, parent, os.path.basename(os.path.abspath(lock)), "unlock")
    held = _read_owner(lock)
    if not held or held.get("token") != token:
        return {"released": False, "held": held}
    aside = os.path.join(parent, ".lock-done.%d" % os.getpid())
    os.rename(lock, aside)
    _remove(aside)
    return {"released": True}


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
    s.add_argument("--level", default="all", choices=sorted(ORT_LEVELS)); s.add_argument("--inline-weights", action="store_true")
    s = sub.add_parser("ort-verify"); s.add_argument("--engine", required=True); s.add_argument("--reference", required=True)
    s.add_argument("--rtol", type=float, default=1e-3); s.add_argument("--atol", type=float, default=1e-4)
    s.add_argument("--strict-order", action="store_true"); s.add_argument("--runs", type=int, default=5)
    # --root optional here only until tests/test_agent_trt.py passes it (kiln always does)
    s = writer("raw-inputs"); s.add_argument("--reference", required=True); s.add_argument("--out-dir", required=True)
    s.add_argument("--int64-as-int32", action="store_true")
    s = writer("run"); s.add_argument("--cwd", required=True); s.add_argument("--timeout", type=float, default=None)
    s.add_argument("program", nargs=argparse.REMAINDER)  # after `--`: the program and its arguments
    s = sub.add_parser("trt-compare"); s.add_argument("--reference", required=True); s.add_argument("--outputs", required=True)
    s.add_argument("--rtol", type=float, default=1e-2); s.add_argument("--atol", type=float, default=1e-2)
    s.add_argument("--strict-order", action="store_true"); s.add_argument("--point", default=None)
    s.add_argument("--times", default=None)
    # presigned URLs are credentials: they come on stdin (first line), never in argv or the
    # environment (ps, /proc/<pid>/cmdline and environ, sshd logs)
    s = writer("fetch"); s.add_argument("--out", required=True); s.add_argument("--sha256", required=True)
    s.add_argument("--if-absent", action="store_true")
    s = sub.add_parser("upload"); s.add_argument("--file", required=True)
    s = writer("activate"); s.add_argument("--model-dir", required=True); s.add_argument("--release", required=True)
    s = writer("rollback"); s.add_argument("--model-dir", required=True); s.add_argument("--swap", action="store_true")
    s = writer("deactivate"); s.add_argument("--model-dir", required=True)
    s = writer("hold"); s.add_argument("--model-dir", required=True)  # the hold (JSON) comes on stdin
    s = writer("unhold"); s.add_argument("--model-dir", required=True)
    s = writer("prune"); s.add_argument("--model-dir", required=True); s.add_argument("--keep", action="append", default=[])
    s = sub.add_parser("state"); s.add_argument("--install-dir", required=True); s.add_argument("models", nargs="*")
    s = writer("stage-begin"); s.add_argument("--model-dir", required=True); s.add_argument("--release", required=True)
    s = writer("stage-commit"); s.add_argument("--model-dir", required=True); s.add_argument("--release", required=True)
    s = writer("remove"); s.add_argument("--path", required=True)
    s = writer("copy"); s.add_argument("--src", required=True); s.add_argument("--dst", required=True)
    s.add_argument("--sha256", default=""); s.add_argument("--move", action="store_true")
    s = writer("clean-inputs"); s.add_argument("--install-dir", required=True); s.add_argument("--keep", action="append", default=[])
    s.add_argument("--min-age", type=float, default=PART_MIN_AGE); s.add_argument("models", nargs="*")
    s = sub.add_parser("free"); s.add_argument("--path", required=True)
    s = writer("lock-take"); s.add_argument("--path", required=True); s.add_argument("--stale-after", type=float, required=True)
    s.add_argument("--grace", type=float, required=True)  # the owner info (JSON) comes on stdin
    s = writer("lock-release"); s.add_argument("--path", required=True); s.add_argument("--token", required=True)
    s = sub.add_parser("host-id")
    s = writer("write"); s.add_argument("--path", required=True)  # the content comes on stdin
    s = sub.add_parser("batch")  # the steps (JSON) come on stdin, see `batch`
    a = p.parse_args(argv)
    if a.cmd == "sha256":
        out = {"sha256": sha256_of(a.path), "size": os.path.getsize(a.path)}
    elif a.cmd == "ort-build":
        out = ort_build(a.onnx, a.out, a.level, a.root, a.inline_weights)
    elif a.cmd == "ort-verify":
        out = ort_verify(a.engine, a.reference, a.rtol, a.atol, not a.strict_order, a.runs)
    elif a.cmd in ("raw-inputs", "trt-compare") and not _has_numpy():
        out = {"ok": False, "reason": "the device's %s has no numpy (needed to check TensorRT outputs); "
               "install it (apt install python3-numpy) or point the target's `python` at one that has it"
               % sys.executable}
    elif a.cmd == "raw-inputs":
        out = raw_inputs(a.reference, a.out_dir, a.int64_as_int32, a.root)
    elif a.cmd == "run":
        program = a.program[1:] if a.program[:1] == ["--"] else a.program
        if not program:
            p.error("run: the program to run goes after --")
        out = run_program(program, a.cwd, a.timeout, a.root)
    elif a.cmd == "trt-compare":
        out = trt_compare(a.reference, a.outputs, a.rtol, a.atol, not a.strict_order, a.point, a.times)
    elif a.cmd == "fetch":
        out = fetch(read_url(), a.out, a.sha256, root=a.root, if_absent=a.if_absent)
    elif a.cmd == "upload":
        out = upload(read_url(), a.file)
    elif a.cmd == "activate":
        out = activate(a.model_dir, a.release, a.root)
    elif a.cmd == "rollback":
        out = rollback(a.model_dir, a.root, a.swap)
    elif a.cmd == "deactivate":
        out = deactivate(a.model_dir, a.root)
    elif a.cmd == "hold":
        out = hold(a.model_dir, json.loads(sys.stdin.readline()), a.root)
    elif a.cmd == "unhold":
        out = unhold(a.model_dir, a.root)
    elif a.cmd == "prune":
        out = prune(a.model_dir, a.keep, a.root)
    elif a.cmd == "state":
        out = state(a.install_dir, a.models)
    elif a.cmd == "stage-begin":
        out = stage_begin(a.model_dir, a.release, a.root)
    elif a.cmd == "stage-commit":
        out = stage_commit(a.model_dir, a.release, a.root)
    elif a.cmd == "remove":
        out = remove(a.path, a.root)
    elif a.cmd == "copy":
        out = copy(a.src, a.dst, a.sha256, a.root, a.move)
    elif a.cmd == "clean-inputs":
        out = clean_inputs(a.install_dir, a.models, a.keep, a.root, a.min_age)
    elif a.cmd == "free":
        out = {"free_bytes": free_bytes(a.path), "path": a.path}
    elif a.cmd == "lock-take":
        out = lock_take(a.path, json.loads(sys.stdin.readline()), a.root, a.stale_after, a.grace)
    elif a.cmd == "lock-release":
        out = lock_release(a.path, a.token, a.root)
    elif a.cmd == "host-id":
        out = {"host": host_id()}
    elif a.cmd == "write":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        out = write_file(a.path, data, a.root)
    elif a.cmd == "batch":
        out = batch(json.loads(sys.stdin.readline()))
    else:
        p.error("missing subcommand")
    print(json.dumps(out, sort_keys=True))
    return 0 if out.get("ok", True) else 3


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Escape as exc:  # a refusal to leave the install_dir: its own exit code, for a clear error
        sys.stderr.write("%s\n" % exc)
        sys.exit(ESCAPE_EXIT)
