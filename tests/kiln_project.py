"""A throwaway enginekiln project for integration tests: a fleet file in a temp
folder, its own artifacts, and `doit` run for real in a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = """
[models.{name}]
factory = "examples.tiny_detector:build_model"
checkpoint = "ckpt/{name}.pt"
seed = {seed}
inputs = {{ pixel_values = [1, 3, 32, 32] }}
outputs = ["logits", "pred_boxes"]
"""


@dataclass
class Run:
    returncode: int
    out: str

    def ran(self) -> set[str]:
        return set(re.findall(r"^\.  (\S+)$", self.out, re.M))

    def uptodate(self) -> set[str]:
        return set(re.findall(r"^-- (\S+)$", self.out, re.M))

    def ran_group(self, group: str) -> set[str]:
        return {t for t in self.ran() if t.split(":")[0] == group}

    def engines(self, *events: str) -> dict[str, str]:
        """Engines this run made sure of, {engine:<model>@<class>: "cache-hit" | "publish"}: their own
        tasks, or a deploy that needed an engine for a class first seen in this run."""
        out = {}
        for name, event in re.findall(r"^  (?:ok     |engine ) (engine:\S+?): (cache-hit|publish|build)\b", self.out, re.M):
            out[name] = event
        return {n: e for n, e in out.items() if not events or e in events}


class Project:
    def __init__(self, root: Path, models: dict[str, int] | None = None, extra: str = "",
                 target_models: list[str] | None = None) -> None:
        self.root = root
        self.artifacts = root / "artifacts"
        models = models or {"tiny": 1}
        target_models = target_models or list(models)
        text = "".join(TINY.format(name=n, seed=s) for n, s in models.items()) + extra
        text += textwrap.dedent(f"""
            [targets.local]
            models = {json.dumps(target_models)}
            install_dir = "deploy"
            """)
        self.fleet = root / "targets.toml"
        self.fleet.write_text(text)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KILN_TARGETS": str(self.fleet), "KILN_ARTIFACTS": str(self.artifacts)}

    def doit(self, *args: str, check: bool = True, timeout: float = 300) -> Run:
        proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=REPO, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        run = Run(proc.returncode, proc.stdout)
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}")
        return run

    def doit_json(self, *args: str, timeout: float = 300) -> tuple[int, object, str]:
        """Run a `--json` command: (exit code, its stdout parsed as one JSON document, stderr).
        The parse is strict: anything but the document on stdout fails it."""
        proc = subprocess.run([sys.executable, "-m", "doit", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        try:
            document = json.loads(proc.stdout)
        except ValueError as exc:
            raise AssertionError(f"stdout of doit {' '.join(args)} is not one JSON document ({exc}):\n"
                                 f"{proc.stdout}\n-- stderr:\n{proc.stderr}") from None
        return proc.returncode, document, proc.stderr

    def checkpoint(self, model: str = "tiny") -> Path:
        return self.root / "ckpt" / f"{model}.pt"

    def active(self, model: str = "tiny") -> str | None:
        link = self.root / "deploy" / model / "current"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def previous(self, model: str = "tiny") -> str | None:
        link = self.root / "deploy" / model / "previous"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def events(self) -> list[dict]:
        path = self.artifacts / "logs" / "events.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    def store_engines(self) -> list[str]:
        """Engine keys the local store serves: a manifest whose blob (named by its sha256) exists."""
        base = self.artifacts / "store" / "entries"
        keys = []
        for manifest in sorted(base.glob("engines/*/*/manifest.json")):
            sha = json.loads(manifest.read_text())["sha256"]
            if (base / "blobs" / sha[:2] / sha).exists():
                keys.append(manifest.parent.name)
        return keys


def doit_watching_imports(env: dict, args: list[str], watched: tuple[str, ...], after: str = "") \
        -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run doit (`doit <args>`) in a fresh interpreter, then `after` (more Python, e.g. printing what
    the run did), and report which of the `watched` modules that interpreter had imported."""
    code = ("import sys; from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader;"
            f"rc = DoitMain(DodoTaskLoader()).run({list(args)!r});{(' ' + after + ';') if after else ''}"
            f"print('IMPORTED=' + ','.join(m for m in {tuple(watched)!r} if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("IMPORTED=")), None)
    assert line is not None, proc.stdout + proc.stderr  # doit ended the interpreter before the report
    return proc, {m for m in line[len("IMPORTED="):].split(",") if m}


def python(code: str, env: dict | None = None) -> str:
    """Run code in a fresh interpreter (for torch work that must not leak into the test process)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        raise AssertionError(proc.stderr)
    return proc.stdout
