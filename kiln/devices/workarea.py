"""A target's working area, reached through its transport.

Layout under the target's install_dir:
    .kiln/inputs/<sha256>.<ext>   the device agent, ONNX files, reference data, scripts: by content,
                                  so each is sent once and re-sent only when it changes
    .kiln/build/<engine key>/     build output before it is fetched and published
    .kiln/lock/                   the deploy lock (mkdir is atomic)
    <model>/releases/<key>/       one release: engine, reference.npz, manifest.json
    <model>/current, previous     symlinks; `current` is switched by an atomic rename

Nothing is written or deleted outside install_dir, and no symlink is followed out of it:
`mkdir` (and so `ensure_input`, `lock`) refuses a folder on the way that is a symlink
leading outside, and every agent subcommand that writes gets `--root <install_dir>` and
checks the same (kiln/device_side/agent.py `inside`). Presigned URLs reach the agent on
its stdin, never in its argv or environment (both visible on the device).
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from kiln.config import Target
from kiln.errors import DeployError, KilnError, TransportError
from kiln.stores.base import Store, staging_entry
from kiln.keys import sha256_file
from kiln.transports.base import Stream, Transport
from kiln.transports.local import LocalTransport

AGENT_SOURCE = Path(__file__).parent.parent / "device_side" / "agent.py"  # sent, never imported here
log = logging.getLogger(__name__)

#: agent subcommands that write or delete on the device: they get `--root <install_dir>`
WRITING_SUBCOMMANDS = frozenset({"ort-build", "raw-inputs", "fetch", "activate", "rollback", "prune"})
_ESCAPE = 77
#: sh: create folders "$3"... (relative to the install_dir "$1") one component at a time,
#: refusing (exit 77) a component that is a symlink leading out of the install_dir; then
#: exit 1 if file "$2" (when not empty) does not exist.
_SAFE_MKDIR = r"""r=$1; f=$2; shift 2
mkdir -p -- "$r" && real=$(cd -- "$r" && pwd -P) || exit 1
real=${real%/}
for rel in "$@"; do
  p=$r; old_ifs=$IFS; IFS=/; set -f
  for c in $rel; do
    [ -n "$c" ] || continue
    p=$p/$c
    if [ -L "$p" ]; then
      where=$(cd -- "$p" 2>/dev/null && pwd -P)
      case "$where/" in
        "$real"/*) ;;
        *) printf 'refusing to create %s: %s is a symlink to %s, outside the install_dir %s
'              "$r/$rel" "$p" "$(readlink -- "$p")" "$r" >&2; exit 77;;
      esac
    fi
    [ -d "$p" ] || mkdir -- "$p" || exit 1
  done
  IFS=$old_ifs; set +f
done
[ -z "$f" ] || [ -f "$f" ] || exit 1"""


class Device:
    def __init__(self, transport: Transport, target: Target) -> None:
        self.transport = transport
        self.config = target
        self.target = target.name
        self.root = target.install_dir
        self._agent_path: str | None = None

    @property
    def is_local(self) -> bool:
        return isinstance(self.transport, LocalTransport)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _relative(self, path: str) -> str:
        root = posixpath.normpath(self.root)
        full = posixpath.normpath(posixpath.join(root, path))
        rel = posixpath.relpath(full, root)
        if rel == ".." or rel.startswith("../"):
            raise DeployError(f"refusing to create {path} on {self.target}: it is outside the install_dir {self.root}",
                              target=self.target)
        return "" if rel == "." else rel

    def _safe_mkdir(self, paths: Sequence[str], test_file: str = "") -> bool:
        """Create `paths` (under install_dir) without following a symlink out of it;
        True if `test_file` (when given) exists afterwards."""
        rels = [self._relative(p) for p in paths]
        result = self.transport.run(["sh", "-c", _SAFE_MKDIR, "kiln-mkdir", self.root, test_file, *rels],
                                    check=False)
        if result.exit_code == _ESCAPE:
            raise DeployError(result.stderr.strip() or f"a folder in {self.root} leads outside it",
                              target=self.target,
                              hint="nothing was written; replace that symlink with a folder inside the install_dir")
        if result.exit_code not in (0, 1) or (result.exit_code == 1 and not test_file):
            raise self.transport._fail(result, "creating folders in the install_dir")
        return result.exit_code == 0

    def mkdir(self, *paths: str) -> None:
        """mkdir -p, refusing paths outside install_dir and symlinks on the way that lead out of it."""
        self._safe_mkdir(paths)

    def agent(self, *args: str, timeout: float | None = None, stream: Stream | None = None,
              check: bool = True, env: dict[str, str] | None = None, stdin: str | None = None) -> dict:
        """Run an agent subcommand; returns its JSON answer. Subcommands that write get
        `--root <install_dir>` (they refuse to write outside it); secrets go on `stdin`."""
        if self._agent_path is None:
            self._agent_path = self.ensure_input(AGENT_SOURCE, sha256_file(AGENT_SOURCE), ".py")
        def progress(line: str) -> None:
            if stream and not line.startswith("{"):  # the JSON answer is data, not progress
                stream(line)
        argv = [self.transport.python, self._agent_path, *args]
        if args and args[0] in WRITING_SUBCOMMANDS:
            argv[2:3] = [args[0], "--root", self.root]
        extra = {"stdin": stdin} if stdin is not None else {}
        result = self.transport.run(argv, timeout=timeout, stream=progress if stream else None, check=False,
                                    env=env, **extra)
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        try:
            answer = json.loads(last)
        except ValueError:
            answer = None
        if answer is None or (check and result.exit_code not in (0, 3)):
            raise self.transport._fail(result, f"kiln agent `{args[0]}`",
                                       hint="see the output above; the device needs python3 (and numpy/onnxruntime for CPU engines)")
        return answer

    def ensure_input(self, local: Path | None, sha256: str, suffix: str = "", *,
                     store: Store | None = None, entry: str | None = None) -> str:
        """Put a content-addressed input on the device once; returns its path there.

        With a store that presigns URLs (S3) and an `entry` name, the device
        downloads it straight from the store; otherwise the controller uploads `local`.
        """
        remote = self.path(".kiln", "inputs", sha256 + suffix)
        # one round trip: the inputs folder made (never through a link out of install_dir), and is it there?
        if not self._safe_mkdir([self.path(".kiln", "inputs")], test_file=remote):
            if not self.fetch_from_store(store, entry, remote, sha256):
                if local is None:
                    raise TransportError(f"cannot get {entry} onto {self.target}", target=self.target,
                                         hint="the store offers no direct download and there is no local copy")
                self.transport.put(local, remote, sha256=sha256)
        return remote

    def fetch_from_store(self, store, entry: str | None, remote: str, sha256: str) -> bool:
        """Device downloads `entry` through a short-lived presigned URL, verified by sha256.
        False if the store cannot presign (a folder) or the device cannot reach it."""
        if store is None or entry is None or not hasattr(store, "presign_get") or self.is_local:
            return False
        try:
            # the URL is a credential: on stdin, not in argv or env (ps and /proc show those)
            self.agent("fetch", "--out", remote, "--sha256", sha256, stdin=store.presign_get(entry) + "\n")
            return True
        except KilnError as exc:
            log.warning("%s could not download %s from the store directly (%s); uploading it instead",
                        self.target, entry, exc.message)
            return False

    def upload_to_store(self, store, remote: str, token: str) -> str | None:
        """Device uploads a file to the store's staging area; returns the staging entry,
        or None if the store cannot presign or the upload failed (the caller falls back)."""
        if not hasattr(store, "presign_put") or self.is_local:
            return None
        staging = staging_entry(token)
        try:
            self.agent("upload", "--file", remote, stdin=store.presign_put(staging) + "\n")
            return staging
        except KilnError as exc:
            log.warning("%s could not upload to the store directly (%s); fetching through the controller",
                        self.target, exc.message)
            return None

    @contextmanager
    def lock(self, owner: str, stale_after: float = 6 * 3600):
        """Per-device lock so two deploys never interleave (mkdir is atomic everywhere)."""
        lock = self.path(".kiln", "lock")
        self.mkdir(self.path(".kiln"))
        info = json.dumps({"owner": owner, "since": time.time()})
        script = ('mkdir "$1" 2>/dev/null && printf %s "$2" > "$1/owner" && exit 0; '
                  'cat "$1/owner" 2>/dev/null; exit 75')
        result = self.transport.run(["sh", "-c", script, "kiln-lock", lock, info], check=False)
        if result.exit_code == 75:
            try:
                held = json.loads(result.stdout or "{}")
            except ValueError:
                held = {}
            age = time.time() - float(held.get("since", time.time()))
            if age < stale_after:
                raise DeployError(f"target {self.target} is locked by another deploy ({held.get('owner', '?')}, "
                                  f"{age:.0f} s ago)", target=self.target,
                                  hint=f"wait for it to finish, or remove {lock} on the device if it died")
            self.transport.run(["rm", "-rf", lock])
            result = self.transport.run(["sh", "-c", script, "kiln-lock", lock, info], check=False)
        if not result.ok:
            raise TransportError(f"cannot take the deploy lock on {self.target}", target=self.target)
        try:
            yield
        finally:
            self.transport.run(["rm", "-rf", lock], check=False)

    def active_releases(self, models: Sequence[str]) -> dict[str, str | None]:
        """Which release each model has active on the device (one round trip, no agent)."""
        links = self.transport.read_links([self.path(m, "current") for m in models])
        return {m: posixpath.basename(link) if link else None for m, link in zip(models, links.values())}
