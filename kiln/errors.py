"""One error root for the whole library.

Every error names what it is about (model, target, key, file) and, where there
is one, the next step for the user. Foreign errors (paramiko, botocore, onnx,
torch) are caught at the boundary and chained (`raise ... from exc`).
"""
from __future__ import annotations


class KilnError(Exception):
    """Root of every error raised on purpose by enginekiln."""

    def __init__(self, message: str, *, hint: str | None = None, **context: object) -> None:
        self.message = message
        self.hint = hint
        self.context = {k: v for k, v in context.items() if v is not None}
        super().__init__(self.__str__())

    def __str__(self) -> str:
        about = ", ".join(f"{k}={v}" for k, v in self.context.items())
        text = f"{self.message} [{about}]" if about else self.message
        return f"{text}\n  fix: {self.hint}" if self.hint else text


class ConfigError(KilnError):
    """The fleet file (targets.toml) is wrong; nothing has been done yet."""


class HashError(KilnError):
    """A file could not be read for hashing."""


class StoreError(KilnError):
    """The artifact store failed or holds something unusable."""


class CorruptEntry(StoreError):
    """A store entry does not match its recorded sha256 (it has been removed)."""


class TransportError(KilnError):
    """A command or a transfer on a target failed, or the target is unreachable."""


class UnreachableError(TransportError):
    """The target (or a ProxyJump hop) cannot be reached or does not speak SSH in time."""


class HostKeyError(TransportError):
    """The target's host key is unknown or differs from the one in known_hosts."""


class AuthenticationFailed(TransportError):
    """The target refused every key/credential offered."""


class CommandFailed(TransportError):
    """A command exited non-zero; carries command, exit code and output tail."""

    def __init__(self, message: str, *, command: str, exit_code: int, output_tail: str,
                 hint: str | None = None, **context: object) -> None:
        self.command = command
        self.exit_code = exit_code
        self.output_tail = output_tail
        super().__init__(message, hint=hint, **context)

    def __str__(self) -> str:
        base = super().__str__()
        tail = "\n".join("    " + line for line in self.output_tail.splitlines())
        return f"{base}\n  command: {self.command}\n  exit code: {self.exit_code}" + (
            f"\n  output (last lines):\n{tail}" if tail else "")


class ProbeError(KilnError):
    """A fingerprint probe could not run or its output could not be parsed."""


class ExportError(KilnError):
    """PyTorch -> ONNX export or one of its checks failed."""


class BuildError(KilnError):
    """An engine build or its verification failed."""


class VerificationError(BuildError):
    """Outputs of an engine (or of ONNX Runtime) differ from the reference."""


class RefitUnsupported(BuildError):
    """This device cannot refit this engine (no TensorRT Python API for the target's python, a base
    that is not refittable, weights the ONNX does not name): the engine is built instead."""


class DeployError(KilnError):
    """Staging, smoke test, activation or health check on a target failed."""


class ResourceError(KilnError):
    """This machine refused a file operation or a program: no space left, no permission, a
    read-only file system, a program that is not installed. Not a bug and not a wrong fleet file:
    the message names the path (or program), what was needed, and the fix. Made from an OSError
    by kiln.oserrors.resource_error, which chains the original."""

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None,
                 hint: str | None = None, **context: object) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message, hint=hint, **context)
