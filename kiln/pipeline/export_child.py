"""Run `export_model` in a child interpreter, so torch never loads in the run's own process.

Why: importing torch and onnx costs ~1.5 s of CPU with the GIL held for much of it, which
slows every SSH probe and transfer running in the run's other threads; and an interpreter that
imported torch takes ~0.8 s to shut down, paid at the end of every run that exported. The child
imports torch while the parent's threads go on, writes the export (the same function, the same
order: records follow bytes), reports its result and leaves with `os._exit` (no torch teardown).
The parent publishes to the store (its client is open already, or opens while the child imports
torch: the child never imports boto3): a missing bucket or bad credentials still fail before the
export's result, and the child then dies unpublished.

Protocol (the child's stdout, one JSON object per line): `{"phase": ...}` as each phase starts;
`{"publish": record}` when the verified bytes are in place, answered on the child's stdin by
`{"published": record}` (the record as published: a reference another export published first
is adopted) before the child writes its local record; then `{"result": {...}}` or
`{"error": {"type", "message", "hint", "context"}}` for a KilnError
(an OSError of the machine arrives translated, as kiln.oserrors explains it). Anything else
(a bug) is a traceback on stderr and a non-zero exit. The child dies with its parent (Linux
PR_SET_PDEATHSIG), and a test's kill point in the child (kiln.faults) kills the parent too,
as it would have killed the one process before.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from kiln import errors, faults
from kiln.errors import ExportError, KilnError


def export_in_child(ctx, model, inputs: dict, activity, publish) -> dict:
    """`export_model(model, ...)` in a child, `publish(record)` (to the run's store) run here when
    the child asks; the export's result."""
    request = {"fleet": str(ctx.fleet.path), "artifacts": str(ctx.artifacts), "model": model.name,
               "inputs": inputs, "parent": os.getpid()}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.pipeline.export_child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    answer = None
    try:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ctx.store  # opened (a missing bucket, bad credentials: failed) while the child imports torch
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "phase" in message:
                activity.phase(message["phase"])
            elif "publish" in message:
                record = message["publish"]
                publish(record)
                proc.stdin.write(json.dumps({"published": record}) + "\n")
                proc.stdin.flush()
            elif "result" in message or "error" in message:
                answer = message
                break
    except BaseException:
        proc.kill()  # unpublished: it must not write its record
        proc.wait()
        raise
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    code = proc.wait()
    reader.join(timeout=5)
    ctx.hashes.reload()  # the child hashed the model's code into the same cache file
    if code == -signal.SIGKILL and os.environ.get(faults.ENV, "").startswith("export:"):
        os.kill(os.getpid(), signal.SIGKILL)  # a test's kill point: the whole run dies there
    if answer is None:
        tail = "".join(stderr)[-3000:].strip()
        raise RuntimeError(f"the export of {model.name} in a child process ended without a result "
                           f"(exit {code}):\n{tail}")
    for line in stderr:  # the child's warnings (kiln's logger), as the run would have shown them
        sys.stderr.write(line)
    if "error" in answer:
        raise _rebuilt(answer["error"])
    return answer["result"]


def _die_with_parent(parent: int) -> None:
    """SIGKILL this child when the thread that started it ends (Linux PR_SET_PDEATHSIG): that
    thread waits for the child, so it ends first only when the whole run died. Set here, after
    exec (a preexec_fn is unsafe in a threaded parent); a parent already gone: exit now."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _rebuilt(error: dict) -> KilnError:
    """The child's KilnError, as the same class with the same message, hint and context."""
    cls = getattr(errors, error.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, KilnError)):
        from kiln import oserrors
        cls = getattr(oserrors, error.get("type", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, KilnError)):
            cls = ExportError
    exc = cls.__new__(cls)
    KilnError.__init__(exc, error["message"], hint=error.get("hint"), **(error.get("context") or {}))
    return exc


# -- the child ------------------------------------------------------------------------------------

class _Phases:
    """The activity the export reports its phases to: lines on stdout for the parent."""

    def phase(self, name: str) -> None:
        _send({"phase": name})

    def note(self, line: str) -> None:
        pass


def _published_by_parent(record: dict) -> None:
    """Ask the parent to publish `record`'s bytes and record; take the record as published."""
    _send({"publish": record})
    answer = json.loads(sys.stdin.readline() or "null")
    if not isinstance(answer, dict) or not isinstance(answer.get("published"), dict):
        raise ExportError("the run ended before the export was published", model=record.get("model"),
                          hint="run again")
    record.clear()
    record.update(answer["published"])


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    import logging

    from kiln.oserrors import explain_os_errors
    from kiln.pipeline.context import Context
    from kiln.pipeline.export import ExportPaths, export_model

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("kiln: %(levelname)s: %(message)s"))
    logging.getLogger("kiln").addHandler(console)
    request = json.loads(sys.stdin.readline())
    _die_with_parent(request["parent"])
    ctx = Context.load(request["fleet"], request["artifacts"])
    model = ctx.fleet.models[request["model"]]
    paths = ExportPaths.for_model(ctx.artifacts, model.name)

    @explain_os_errors
    def run(ctx) -> dict:
        return export_model(model, paths, request["inputs"], publish=_published_by_parent,
                            activity=_Phases(), hashes=ctx.hashes)
    try:
        _send({"result": run(ctx)})
    except KilnError as exc:
        _send({"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                         "context": {k: v if isinstance(v, (str, int, float, bool)) else str(v)
                                     for k, v in exc.context.items()}}})
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: torch's takes ~0.8 s and nothing here needs it


if __name__ == "__main__":
    main()
