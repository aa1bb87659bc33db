"""The device-side probe: one POSIX sh script, its argv, and the cutter for its output.

The script prints one `@@kiln:<section>@@ ... @@kiln:end@@` block per source it
finds (docs/devices.md lists the sources and why each is read); parsing the
blocks into a fingerprint is kiln.devices.fingerprint.parse_probe_output.
Headers and small files are sent whole, so the parsers see the real text
(include guards, comments, blank lines and all; docs/devices.md §5).
"""
from __future__ import annotations

import re

__all__ = ["PROBE_FORMAT", "PROBE_SCRIPT", "probe_argv", "split_sections", "CUDNN_HEADERS",
           "NVINFER_HEADERS"]

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

#: POSIX sh; needs only sh, cat, tr, uname (and uses dpkg-query, nvidia-smi, nvpmodel,
#: nvcc, trtexec, python3 when present). Never fails: missing sources are just absent.
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
if [ -f "$TRTEXEC" ] && [ -x "$TRTEXEC" ]; then
  begin trtexec_banner
  "$TRTEXEC" --help 2>/dev/null </dev/null | while IFS= read -r l; do
    case "$l" in '&&&& RUNNING'*) printf '%s\n' "$l" ;; esac
  done
  end
fi
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
import sys
print("@@kiln:python@@\n%d.%d.%d\n@@kiln:end@@" % sys.version_info[:3])
sys.stdout.flush()
for sec, mod in (("python_tensorrt", "tensorrt"), ("onnxruntime", "onnxruntime")):
    try:
        m = __import__(mod)
    except Exception:
        continue
    print("@@kiln:%s@@\n%s\n@@kiln:end@@" % (sec, getattr(m, "__version__", "")))
    sys.stdout.flush()
KILN_PY
fi
exit 0
""".replace("@FORMAT@", PROBE_FORMAT).replace(
    "@CUDNN_HEADERS@", " ".join(f'"$R"{p}' for p in CUDNN_HEADERS)).replace(
    "@NVINFER_HEADERS@", " ".join(f'"$R"{p}' for p in NVINFER_HEADERS))


def probe_argv(trtexec: str | None = None, python: str = "python3") -> list[str]:
    """argv to run PROBE_SCRIPT through `Transport.run` (every element is quoted by the transport)."""
    return ["sh", "-c", PROBE_SCRIPT, "kiln-probe", trtexec or "", python]


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

