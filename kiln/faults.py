"""Test hook: kill the process at a named step of a publish or activation sequence.

`KILN_KILL_AT=<step>` in the environment makes `kill_point(<step>)` send SIGKILL to
the current process right there, the way a power cut or an OOM kill would: no
cleanup, no `finally`. Tests use it to prove that a kill between any two publish
steps leaves the old or the new state and that the next run finishes the job
(tests/test_records.py). Unset (always, outside tests), it costs one env lookup.

The steps, in order:
  export:exported             ONNX + reference in temp files, verified; nothing published
  export:onnx-published       ONNX bytes in the store
  export:reference-published  reference data in the store
  export:pointer-published    models/<model>/onnx.json in the store names the new ONNX
  export:record-written       local artifacts/onnx/<model>.json written (provenance not yet)
  engine:built                engine built and verified on the device; nothing published
  engine:blob-published       engine bytes in the store as blobs/<ab>/<sha256>, verified
  engine:manifest-published   engines/<ab>/<key>/manifest.json names the blob
  engine:record-written       local artifacts/engines/<model>@<class>.json written
  deploy:locked               the device's deploy lock is held; nothing staged
  deploy:staged               every release staged and smoke-tested in releases/<key>; none active
  deploy:activated            the `current` links switched; restart and health check not run yet
  deploy:checked              restart and health check passed; the deployment record not written yet
"""
from __future__ import annotations

import os
import signal

ENV = "KILN_KILL_AT"
STEPS = ("export:exported", "export:onnx-published", "export:reference-published",
         "export:pointer-published", "export:record-written",
         "engine:built", "engine:blob-published", "engine:manifest-published", "engine:record-written",
         "deploy:locked", "deploy:staged", "deploy:activated", "deploy:checked")


def kill_point(step: str) -> None:
    """SIGKILL this process if `KILN_KILL_AT` names `step` (a test hook; see the module doc)."""
    if os.environ.get(ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
