"""The device-side probe: one POSIX sh script, its argv, and the cutter for its output.

The script prints one `@@kiln:<section>@@ ... @@kiln:end@@` block per source it
finds (docs/devices.md lists the sources and why each is read); parsing the
blocks into a fingerprint is kiln.devices.fingerprint.parse_probe_output.
Headers and small files are sent whole, so the parsers see the real text
(include guards, comments, blank lines and all; docs/devices.md §5).

The probe is cheap (docs/devices.md §8): it reads files and runs nothing that
loads CUDA or TensorRT (no trtexec, no `import tensorrt`, no `import onnxruntime`
when the package's files name its version). Only when those cheap TensorRT sources
are missing or disagree (kiln.devices.fingerprint.fallback_reason) does
`probe_remote` send FALLBACK_SCRIPT, which imports tensorrt in the device's python
(else runs `trtexec --help`), and the fingerprint says so (`probe_fallback`).
"""
from __future__ import annotations

import re

__all__ = ["PROBE_FORMAT", "PROBE_SCRIPT", "probe_argv", "split_sections", "CUDNN_HEADERS",
           "NVINFER_HEADERS", "FALLBACK_SCRIPT", "fallback_argv"]

PROBE_FORMAT = "1"

#: Where cuDNN's version header lives, first match wins (docs/devices.md §2): the
#: alternatives alias, then the Debian multiarch layout (`/usr/include/<triplet>/`:
#: aarch64-linux-gnu on a Jetson, x86_64-linux-gnu on a server, where
#: cudnn_version.h is itself a symlink to cudnn_version_v9.h), then CUDA's own tree.
#: Shell globs; `[ -r ]` skips a pattern that matched nothing.
CUDNN_HEADERS = (
    "/usr/include/cudnn_version.h",
    "/usr/include/*-linux-gnu/cudnn_version.h",
    "/usr/include/*-linux-gnu/cudnn_version_v9.h",
    "/usr/include/*-linux-gnu/cudnn_version_v8.h",
    "/usr/local/cuda/include/cudnn_version.h",
)
#: TensorRT's version header (docs/devices.md §2): the multiarch layout the debs
#: install, then a plain /usr/include.
NVINFER_HEADERS = (
    "/usr/include/*-linux-gnu/NvInferVersion.h",
    "/usr/include/NvInferVersion.h",
)

#: Run by the device's python (3.6+, stdlib only): its version, then the versions of
#: onnxruntime and tensorrt as their installed files say, without importing either.
#: The package is located as `import` would (PathFinder.find_spec of a top-level name
#: imports nothing); onnxruntime's version is what `onnxruntime.__version__` returns:
#: capi/build_and_package_info.py's `__version__`, else the literal in __init__.py;
#: then the distribution's METADATA. onnxruntime is imported only when its package
#: exists but no file names a version (onnxruntime_source says which).
_PY_CHEAP = r"""
import os, re, sys
print("@@kiln:python@@\n%d.%d.%d\n@@kiln:end@@" % sys.version_info[:3])
VER = re.compile(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"\n]+)['\"]", re.M)
def out(sec, text):
    print("@@kiln:%s@@\n%s\n@@kiln:end@@" % (sec, text))
    sys.stdout.flush()
def literal(path):
    try:
        with open(path, errors="replace") as f:
            m = VER.search(f.read(65536))
    except (OSError, ValueError):
        return None
    return m.group(1).strip() if m else None
def package(name):
    try:
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name)
    except Exception:
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return os.path.dirname(origin) if origin and os.path.isfile(origin) else None
def dist_version(names):
    for entry in sys.path:
        try:
            items = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for item in items:
            base, dot, kind = item.rpartition(".")
            if kind not in ("dist-info", "egg-info") or re.sub(r"[-_.]+", "_", base.split("-")[0]).lower() not in names:
                continue
            path = os.path.join(entry or ".", item)
            if os.path.isdir(path):
                path = os.path.join(path, "METADATA" if kind == "dist-info" else "PKG-INFO")
            try:
                with open(path, errors="replace") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():
                            break
            except OSError:
                continue
    return None
ort = package("onnxruntime")
if ort:
    v, how = literal(os.path.join(ort, "capi", "build_and_package_info.py")), "python-file"
    v = v or literal(os.path.join(ort, "__init__.py"))
    if not v:
        v, how = dist_version(("onnxruntime", "onnxruntime_gpu", "onnxruntime_openvino", "onnxruntime_directml",
                               "onnxruntime_rocm", "onnxruntime_qnn", "onnxruntime_training")), "dist-info"
    if not v:
        try:
            v, how = getattr(__import__("onnxruntime"), "__version__", None), "import"
        except Exception:
            v = None
    if v:
        out("onnxruntime", v)
        out("onnxruntime_source", how)
trt = package("tensorrt")
if trt:
    out("python_tensorrt_spec", trt)
    v = literal(os.path.join(trt, "__init__.py"))
    if v:
        out("python_tensorrt_file", v)
v = dist_version(("tensorrt", "tensorrt_bindings", "tensorrt_cu11_bindings", "tensorrt_cu12_bindings",
                  "tensorrt_cu13_bindings"))
if v:
    out("python_tensorrt_dist", v)
"""

#: Sent only when the cheap sources cannot settle TensorRT (fingerprint.fallback_reason):
#: imports tensorrt in the device's python (loads libnvinfer and CUDA), and runs
#: `trtexec --help` for its banner only if that import gave no version.
#: Args: $1 = trtexec path, $2 = python, $3 = why (echoed in section `fallback`).
FALLBACK_SCRIPT = r"""
R="${KILN_PROBE_ROOT:-}"
TRTEXEC="${1:-${KILN_TRTEXEC:-$R/usr/src/tensorrt/bin/trtexec}}"
PY="${2:-python3}"
begin() { printf '@@kiln:%s@@\n' "$1"; }
end() { printf '\n@@kiln:end@@\n'; }
begin fallback; printf '%s\n' "$3"; end
pyout=
if command -v "$PY" >/dev/null 2>&1; then
  pyout="$("$PY" - 2>/dev/null <<'KILN_PY'
try:
    import tensorrt
    print("@@kiln:python_tensorrt@@\n%s\n@@kiln:end@@" % getattr(tensorrt, "__version__", ""))
except Exception:
    pass
KILN_PY
)"
  [ -n "$pyout" ] && printf '%s\n' "$pyout"
fi
case "$pyout" in
  *'@@kiln:python_tensorrt@@'*) ;;
  *)
    if [ -f "$TRTEXEC" ] && [ -x "$TRTEXEC" ]; then
      begin trtexec_banner
      "$TRTEXEC" --help 2>/dev/null </dev/null | while IFS= read -r l; do
        case "$l" in '&&&& RUNNING'*) printf '%s\n' "$l" ;; esac
      done
      end
    fi ;;
esac
exit 0
"""


#: POSIX sh; needs only sh, cat, tr, uname (and uses dpkg-query, nvidia-smi, nvpmodel,
#: nvcc, python3 when present). Never fails: missing sources are just absent. It only
#: looks whether trtexec exists (section trtexec_path), and python3 only reads package
#: files (_PY_CHEAP): nothing here loads libnvinfer or CUDA.
#: Args: $1 = trtexec path (default /usr/src/tensorrt/bin/trtexec), $2 = python (default python3).
#: Env KILN_PROBE_ROOT prefixes every *file* path (tests run it against a fake root).
PROBE_SCRIPT = r"""
R="${KILN_PROBE_ROOT:-}"
TRTEXEC="${1:-${KILN_TRTEXEC:-$R/usr/src/tensorrt/bin/trtexec}}"
PY="${2:-python3}"
begin() { printf '@@kiln:%s@@\n' "$1"; }
end() { printf '\n@@kiln:end@@\n'; }
have() { command -v "$1" >/dev/null 2>&1; }
file_section() { # name path [nul->newline]
  if [ -r "$2" ] && [ -f "$2" ]; then
    begin "$1"
    if [ -n "$3" ]; then tr '\000' '\n' < "$2" 2>/dev/null; else cat "$2" 2>/dev/null; fi
    end
  fi
}
begin probe; printf '%s\n' "@FORMAT@"; end
begin uname_m; uname -m 2>/dev/null; end
if [ -r "$R/proc/cpuinfo" ]; then
  begin cpuinfo
  while IFS= read -r l; do [ -z "$l" ] && break; printf '%s\n' "$l"; done < "$R/proc/cpuinfo"
  end
fi
file_section nv_tegra_release "$R/etc/nv_tegra_release"
# /proc/device-tree is a symlink to /sys/firmware/devicetree/base; read either
for f in model compatible; do
  for dt in "$R/proc/device-tree" "$R/sys/firmware/devicetree/base"; do
    if [ -r "$dt/$f" ]; then file_section "dt_$f" "$dt/$f" nul; break; fi
  done
done
if have dpkg-query; then
  begin dpkg
  dpkg-query -W -f='${db:Status-Abbrev}|${Package} ${Version}\n' nvidia-l4t-core nvidia-jetpack \
    'libnvinfer[0-9]*' tensorrt python3-libnvinfer 'libcudnn[0-9]*' 'cuda-toolkit-[0-9]*' 2>/dev/null
  end
fi
file_section cuda_version_json "$R/usr/local/cuda/version.json"
file_section cuda_version_txt "$R/usr/local/cuda/version.txt"
NVCC="$R/usr/local/cuda/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc 2>/dev/null)"
if [ -n "$NVCC" ] && [ -x "$NVCC" ]; then begin nvcc; "$NVCC" --version 2>&1 </dev/null; end; fi
# headers are sent whole (guards, comments and all); the first readable one wins
for f in @CUDNN_HEADERS@; do
  if [ -r "$f" ] && [ -f "$f" ]; then file_section cudnn_header "$f"; break; fi
done
for f in @NVINFER_HEADERS@; do
  if [ -r "$f" ] && [ -f "$f" ]; then file_section nvinfer_header "$f"; break; fi
done
if [ -f "$TRTEXEC" ] && [ -x "$TRTEXEC" ]; then begin trtexec_path; printf '%s\n' "$TRTEXEC"; end; fi
if have nvidia-smi; then
  smi_out="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,pci.device_id --format=csv,noheader 2>&1 </dev/null)"
  smi_rc=$?
  if [ "$smi_rc" -eq 0 ]; then
    begin nvidia_smi; printf '%s\n' "$smi_out"; end
  else
    case "$smi_out" in
      *'not a valid field'*)
        smi_retry="$(nvidia-smi --query-gpu=name,driver_version,memory.total,pci.device_id --format=csv,noheader 2>&1 </dev/null)" \
          && { begin nvidia_smi_nocc; printf '%s\n' "$smi_retry"; end; } ;;
    esac
    begin nvidia_smi_error; printf 'rc=%s\n%s\n' "$smi_rc" "$smi_out"; end
  fi
fi
if have nvpmodel; then begin nvpmodel; nvpmodel -q 2>/dev/null </dev/null; end; fi
if have "$PY"; then
  "$PY" - 2>/dev/null <<'KILN_PY' || true
@PY_CHEAP@
KILN_PY
fi
exit 0
""".replace("@FORMAT@", PROBE_FORMAT).replace("@PY_CHEAP@", _PY_CHEAP.strip()).replace(
    "@CUDNN_HEADERS@", " ".join(f'"$R"{p}' for p in CUDNN_HEADERS)).replace(
    "@NVINFER_HEADERS@", " ".join(f'"$R"{p}' for p in NVINFER_HEADERS))


def probe_argv(trtexec: str | None = None, python: str = "python3") -> list[str]:
    """argv to run PROBE_SCRIPT through `Transport.run` (every element is quoted by the transport)."""
    return ["sh", "-c", PROBE_SCRIPT, "kiln-probe", trtexec or "", python]


def fallback_argv(reason: str, trtexec: str | None = None, python: str = "python3") -> list[str]:
    """argv to run FALLBACK_SCRIPT (the expensive TensorRT sources) through `Transport.run`."""
    return ["sh", "-c", FALLBACK_SCRIPT, "kiln-probe-fallback", trtexec or "", python, reason]


_MARK = re.compile(r"^@@kiln:([a-z0-9_]+)@@$")


def split_sections(text: str) -> dict[str, str]:
    """Cut probe output into {section: text}; text has the end marker's padding newline removed."""
    sections: dict[str, str] = {}
    name, lines = None, []
    for line in text.splitlines():
        m = _MARK.match(line.strip())
        if m and m.group(1) == "end":
            if name is not None:
                body = "\n".join(lines)
                sections[name] = body[:-1] if body.endswith("\n") else body
            name, lines = None, []
        elif m and name is None:
            name, lines = m.group(1), []
        elif name is not None:
            lines.append(line)
    return sections

