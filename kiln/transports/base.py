"""How commands and files reach a target: one contract, local and SSH implementations.

`run` takes an argv list (every element is quoted for the remote shell, so names
from config can never inject shell) and returns a `Result`; a non-zero exit
raises `CommandFailed` with the command, exit code and output tail unless
`check=False`. `put` uploads to a temp name, verifies the sha256 on the target,
then renames, so a partial upload is never visible. Constructors do no I/O.
"""
from __future__ import annotations

import abc
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kiln.errors import CommandFailed, TransportError

TAIL_LINES = 20
Stream = Callable[[str], None]


@dataclass(frozen=True)
class Result:
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def tail(self, lines: int = TAIL_LINES) -> str:
        text = (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).rstrip()
        return "\n".join(text.splitlines()[-lines:])


def quote_argv(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


class Transport(abc.ABC):
    """A way to reach one target. Use as a context manager, or call close()."""

    target: str
    #: the interpreter that runs kiln's device agent on the target
    python: str

    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True,
            stream: Stream | None = None, env: dict[str, str] | None = None) -> Result:
        """Run argv on the target. `stream` receives output lines as they arrive."""

    @abc.abstractmethod
    def put(self, local: Path | str, remote: str, *, sha256: str | None = None) -> str:
        """Upload to `remote` atomically; returns the sha256 verified on the target."""

    @abc.abstractmethod
    def get(self, remote: str, local: Path | str) -> str:
        """Download `remote` to `local` atomically; returns its sha256."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, result: Result, what: str, hint: str | None = None) -> CommandFailed:
        return CommandFailed(f"{what} failed on target {self.target}", command=result.command,
                             exit_code=result.exit_code, output_tail=result.tail(), hint=hint,
                             target=self.target)


def _pump(pipe, sink: list[str], stream: Stream | None) -> None:
    for line in iter(pipe.readline, ""):
        sink.append(line)
        if stream:
            stream(line.rstrip("\n"))
    pipe.close()


class LocalTransport(Transport):
    """This machine. Commands run without a shell; files are copied."""

    def __init__(self, target: str = "local", python: str | None = None) -> None:
        self.target = target
        self.python = python or sys.executable

    def run(self, argv, *, timeout=None, check=True, stream=None, env=None) -> Result:
        command = quote_argv(argv)
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True, env=full_env)
        except OSError as exc:
            raise TransportError(f"cannot start {argv[0]!r} on target {self.target}: {exc.strerror}",
                                 target=self.target, command=command) from exc
        out, err = [], []
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, stream), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, err, stream), daemon=True)]
        for t in pumps:
            t.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for t in pumps:
                t.join()
            raise TransportError(f"command timed out after {timeout}s on target {self.target}",
                                 target=self.target, command=command,
                                 hint="raise the timeout for this target or check why it hangs")
        for t in pumps:
            t.join()
        result = Result(command, code, "".join(out), "".join(err))
        if check and code != 0:
            raise self._fail(result, f"command {Path(str(argv[0])).name}")
        return result

    def put(self, local, remote, *, sha256=None) -> str:
        from kiln.stores.base import atomic_copy
        sha, _ = atomic_copy(Path(local), Path(remote))
        if sha256 and sha != sha256:
            Path(remote).unlink(missing_ok=True)
            raise TransportError(f"upload of {Path(local).name} to {self.target} arrived corrupted",
                                 target=self.target, expected=sha256, actual=sha)
        return sha

    def get(self, remote, local) -> str:
        from kiln.stores.base import atomic_copy
        try:
            sha, _ = atomic_copy(Path(remote), Path(local))
        except FileNotFoundError as exc:
            raise TransportError(f"{remote} does not exist on target {self.target}",
                                 target=self.target) from exc
        return sha
