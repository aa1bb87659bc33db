"""How commands and files reach a target: the one contract (`Transport`, `Result`).

Implementations: `LocalTransport` (kiln.transports.local), `SSHTransport`
(kiln.transports.ssh).

`run` takes an argv list (every element is quoted for the remote shell, so names
from config can never inject shell) and returns a `Result`; a non-zero exit
raises `CommandFailed` with the command, exit code and output tail unless
`check=False`. Secrets go on `stdin`, never in argv or env. `put` uploads to a temp name, verifies the sha256 on the target,
then renames, so a partial upload is never visible. Constructors do no I/O.
"""
from __future__ import annotations

import abc
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kiln.errors import CommandFailed

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
    #: where large uploads and downloads are shown (a kiln.progress.Progress; the run's Context
    #: sets it), or None: not shown
    display = None

    #: where kiln's device agent was put (and checked) on the target through this connection:
    #: every step of a run on that device uses it without looking again (kiln.devices.workarea)
    agent_path: str | None = None

    @abc.abstractmethod
    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True,
            stream: Stream | None = None, env: dict[str, str] | None = None,
            stdin: str | None = None) -> Result:
        """Run argv on the target. `stream` receives output lines as they arrive.

        `stdin` (small: a line or a few KiB) is written to the command's standard input,
        which is then closed; without it the command reads end-of-file. It is the way to
        hand a secret (a presigned URL) to a command: argv and `env` are visible on the
        target (ps, /proc/<pid>/cmdline and environ; over SSH env is part of the command).
        """

    @abc.abstractmethod
    def put(self, local: Path | str, remote: str, *, sha256: str | None = None) -> str:
        """Upload to `remote` atomically; returns the sha256 verified on the target."""

    @abc.abstractmethod
    def get(self, remote: str, local: Path | str) -> str:
        """Download `remote` to `local` atomically; returns its sha256."""

    def read_links(self, paths: Sequence[str]) -> dict[str, str | None]:
        """Where each symlink in `paths` points (None: not a link), in one round trip."""
        script = 'for p in "$@"; do printf "%s\\n" "$(readlink -- "$p" 2>/dev/null)"; done'
        lines = self.run(["sh", "-c", script, "kiln-readlink", *paths]).stdout.split("\n")
        return {p: (lines[i] or None) if i < len(lines) else None for i, p in enumerate(paths)}

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
