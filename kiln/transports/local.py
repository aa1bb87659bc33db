"""`LocalTransport`: the Transport contract on this machine. Commands run without a shell."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from kiln.errors import TransportError
from kiln.files import atomic_file, copy_hashing
from kiln.progress import short_name, transfer
from kiln.transports.base import Result, Transport, quote_argv
from kiln.transports.lines import LineSink

CHUNK = 1 << 16


def _pump(pipe, sink: LineSink) -> None:
    with pipe:
        for data in iter(lambda: pipe.read1(CHUNK), b""):
            sink.feed(data)
    sink.close()


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, OSError):  # the command exited without reading it all
        pass


class LocalTransport(Transport):
    """This machine. Commands run without a shell; files are copied atomically."""

    def __init__(self, target: str = "local", python: str | None = None) -> None:
        self.target = target
        self.python = python or sys.executable

    def read_links(self, paths):
        """Read here, without a shell: a no-op run on this machine starts no process."""
        links = {}
        for path in paths:
            try:
                links[path] = os.readlink(path)
            except OSError:
                links[path] = None
        return links

    def run(self, argv, *, timeout=None, check=True, stream=None, env=None, stdin=None) -> Result:
        command = quote_argv(argv)
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, env=full_env, start_new_session=True)
        except OSError as exc:
            raise self._cannot_start(exc, str(argv[0]), command) from exc
        out, err = LineSink(stream), LineSink(stream)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, out), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, err), daemon=True)]
        if stdin is not None:
            pumps.append(threading.Thread(target=_feed, args=(proc.stdin, stdin.encode()), daemon=True))
        for t in pumps:
            t.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:  # the whole process group: a child left holding the pipes would block the pumps
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            for t in pumps:
                t.join()
            raise TransportError(f"command timed out after {timeout}s on target {self.target}",
                                 target=self.target, command=command,
                                 hint="raise the timeout for this target or check why it hangs")
        for t in pumps:
            t.join()
        result = Result(command, code, out.text, err.text)
        if check and code != 0:
            raise self._fail(result, f"command {Path(str(argv[0])).name}")
        return result

    def _cannot_start(self, exc: OSError, program: str, command: str) -> TransportError:
        """A program that is not there (or not runnable): its path and which setting names it."""
        from kiln.oserrors import resource_error
        if program == self.python:
            fix = (f"set python of [targets.{self.target}] in the fleet file to an interpreter that exists "
                   "(default: the one running enginekiln)")
        else:
            fix = (f"install {Path(program).name} on this machine, or set its full path in "
                   f"[targets.{self.target}] of the fleet file (e.g. trtexec = \"/usr/src/tensorrt/bin/trtexec\")")
        err = resource_error(exc, program=program, doing=f"target {self.target}", fix=fix)
        if err is None:
            return TransportError(f"cannot start {program!r} on target {self.target}: {exc.strerror}",
                                  target=self.target, command=command)
        return TransportError(err.message, hint=err.hint, target=self.target, command=command)

    def put(self, local, remote, *, sha256=None) -> str:
        try:
            fin = open(local, "rb")
        except FileNotFoundError as exc:
            raise TransportError(f"cannot upload {local}: no such local file", target=self.target) from exc
        stat = os.fstat(fin.fileno())
        mode = stat.st_mode & 0o777  # kept, as over SSH
        with fin, transfer(self.display, f"upload {short_name(Path(local).name)} to {self.target}", stat.st_size) as shown, \
                atomic_file(remote, mode=mode) as fout:
            sha, _ = copy_hashing(fin, fout, shown.advance)
            if sha256 and sha != sha256:  # refused inside atomic_file: the previous file stays
                raise TransportError(f"local file {local} does not match its expected sha256; not uploaded",
                                     target=self.target, expected=sha256, actual=sha)
        return sha

    def get(self, remote, local) -> str:
        try:
            fin = open(remote, "rb")
        except FileNotFoundError as exc:
            raise TransportError(f"{remote} does not exist on target {self.target}",
                                 target=self.target) from exc
        label = f"download {short_name(Path(remote).name)} from {self.target}"
        with fin, transfer(self.display, label, os.fstat(fin.fileno()).st_size) as shown, \
                atomic_file(local) as fout:
            sha, _ = copy_hashing(fin, fout, shown.advance)
        return sha
