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
import os
import posixpath
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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
WRITING_SUBCOMMANDS = frozenset({"ort-build", "raw-inputs", "fetch", "activate", "rollback", "prune",
                                 "deactivate", "hold", "unhold", "write",
                                 "stage-begin", "stage-commit", "remove", "copy", "clean-inputs",
                                 "lock-take", "lock-release", "run"})
#: a deploy lock without a readable owner (a run killed by older code) is stale after this many seconds
LOCK_GRACE = 60.0
MB = 1 << 20
_ESCAPE = 77
#: sh: create folders "$4"... (relative to the install_dir "$1") one component at a time,
#: refusing (exit 77) a component that is a symlink leading out of the install_dir; then, when
#: file "$2" is given: print `free_kb=` (df -Pk of its folder), exit 1 if it does not exist,
#: else print `sha=` its sha256 (sha256sum, else python "$3").
_SAFE_MKDIR = r"""r=$1; f=$2; py=$3; shift 3
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
[ -n "$f" ] || exit 0
printf 'free_kb=%s\n' "$(df -Pk "${f%/*}" 2>/dev/null | awk 'NR==2 {print $4}')"
[ -f "$f" ] || exit 1
if command -v sha256sum >/dev/null 2>&1; then s=$(sha256sum < "$f"); else
  s=$("$py" -c 'import hashlib,sys
h=hashlib.sha256()
f=open(sys.argv[1],"rb")
for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$f"); fi
printf 'sha=%s\n' "$(printf %s "$s" | cut -c1-64)"
"""


#: sh: for the install_dir "$1" and each model "$2"...: its `current` and `previous` links, its
#: hold and the current release's manifest (JSON, newlines dropped: JSON escapes them in strings);
#: then every other folder of the install_dir with an active release (a model left the list).
_RELEASE_STATE = r"""r=$1; shift
for m in "$@"; do
  printf '@model %s\n' "$m"
  printf 'current=%s\n' "$(readlink -- "$r/$m/current" 2>/dev/null)"
  printf 'previous=%s\n' "$(readlink -- "$r/$m/previous" 2>/dev/null)"
  [ -f "$r/$m/hold.json" ] && printf 'hold=%s\n' "$(tr -d '\n' < "$r/$m/hold.json")"
  [ -L "$r/$m/current" ] && [ -f "$r/$m/current/manifest.json" ] && \
    printf 'manifest=%s\n' "$(tr -d '\n' < "$r/$m/current/manifest.json")"
done
for d in "$r"/*/; do
  n=${d%/}; n=${n##*/}
  [ -L "$r/$n/current" ] && printf '@active %s=%s\n' "$n" "$(readlink -- "$r/$n/current")"
done
exit 0
"""


@dataclass
class ReleaseState:
    """What one model has on a device: read from the device itself, never from our records."""
    model: str
    current: str | None = None       # engine key of the active release
    previous: str | None = None
    hold: dict | None = None         # set by `doit rollback:<t>`: {"release", "from", "wanted", "at", "by"}
    manifest: dict = field(default_factory=dict)  # the active release's manifest.json

    @property
    def deployed_at(self) -> str | None:
        return self.manifest.get("deployed_at")

    @property
    def latency_ms(self) -> float | None:
        median = ((self.manifest.get("smoke_test") or {}).get("latency_ms") or {}).get("median")
        return float(median) if isinstance(median, (int, float)) else None


def parse_release_state(text: str, models: Sequence[str]) -> tuple[dict[str, ReleaseState], dict[str, str]]:
    """The output of _RELEASE_STATE -> (state per listed model, {other folder: its active key})."""
    states = {m: ReleaseState(m) for m in models}
    others: dict[str, str] = {}
    state: ReleaseState | None = None
    for line in text.splitlines():
        if line.startswith("@model "):
            state = states.get(line[len("@model "):])
        elif line.startswith("@active "):
            name, _, link = line[len("@active "):].partition("=")
            if name not in states and link:
                others[name] = posixpath.basename(link)
        elif state is not None and "=" in line:
            field_name, _, value = line.partition("=")
            if field_name in ("current", "previous"):
                setattr(state, field_name, posixpath.basename(value) if value else None)
            elif field_name in ("hold", "manifest"):
                try:
                    parsed = json.loads(value)
                except ValueError:
                    log.warning("unreadable %s for %s on the device: %.80s", field_name, state.model, value)
                    continue
                if isinstance(parsed, dict):
                    setattr(state, field_name, parsed)
    return states, others


def _local_release_state(root: str, models: Sequence[str]) -> str:
    """_RELEASE_STATE's output, produced in this process."""
    def link(path: str) -> str:
        try:
            return os.readlink(path)
        except OSError:
            return ""

    def flat(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().replace("\n", "")
        except OSError:
            return None
    out = []
    for m in models:
        out += [f"@model {m}", f"current={link(posixpath.join(root, m, 'current'))}",
                f"previous={link(posixpath.join(root, m, 'previous'))}"]
        for name, path in (("hold", posixpath.join(root, m, "hold.json")),
                           ("manifest", posixpath.join(root, m, "current", "manifest.json"))):
            if (text := flat(path)) is not None and (name == "hold" or os.path.islink(posixpath.join(root, m, "current"))):
                out.append(f"{name}={text}")
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    for n in names:
        if not n.startswith(".") and (target := link(posixpath.join(root, n, "current"))):
            out.append(f"@active {n}={target}")
    return "\n".join(out) + "\n"


class DeviceLock:
    """A deploy lock held on a device (Device.lock): the agent step that releases it, for the last
    batch of the deploy; `released_by(answer)` takes the agent's answer to that step, wherever it ran."""

    def __init__(self, target: str, step: tuple[str, ...]) -> None:
        self.target, self.step = target, step
        self.released = False

    def release_step(self) -> tuple[tuple[str, ...], None]:
        return self.step, None

    def released_by(self, answer: dict) -> None:
        self.released = True  # released, or no longer ours to release
        if not answer.get("released"):
            log.warning("the deploy lock on %s is no longer ours (held by %s); left alone",
                        self.target, (answer.get("held") or {}).get("owner"))


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
        return self._prepare(paths, test_file)[0]

    def _prepare(self, paths: Sequence[str], test_file: str = "") -> tuple[bool, str | None, int | None]:
        """`_safe_mkdir`, then (exists, sha256, free bytes) of `test_file` and its folder."""
        rels = [self._relative(p) for p in paths]
        result = self.transport.run(["sh", "-c", _SAFE_MKDIR, "kiln-mkdir", self.root, test_file,
                                     self.transport.python, *rels], check=False)
        if result.exit_code == _ESCAPE:
            raise DeployError(result.stderr.strip() or f"a folder in {self.root} leads outside it",
                              target=self.target,
                              hint="nothing was written; replace that symlink with a folder inside the install_dir")
        if result.exit_code not in (0, 1) or (result.exit_code == 1 and not test_file):
            raise self.transport._fail(result, "creating folders in the install_dir")
        facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        free = int(facts["free_kb"]) * 1024 if facts.get("free_kb", "").isdigit() else None
        return result.exit_code == 0, facts.get("sha") or None, free

    def check_space(self, need: int, free: int | None, where: str) -> None:
        """Refuse an upload of `need` bytes into `where` when its filesystem has less free."""
        if free is not None and need > free:
            raise DeployError(f"not enough space on {self.target}: needs {-(-need // MB)} MB, "
                              f"has {free // MB} MB on {self.target}:{where}", target=self.target,
                              hint="free space on the device (nothing was uploaded)")

    def mkdir(self, *paths: str) -> None:
        """mkdir -p, refusing paths outside install_dir and symlinks on the way that lead out of it."""
        self._safe_mkdir(paths)

    def agent(self, *args: str, timeout: float | None = None, stream: Stream | None = None,
              check: bool = True, env: dict[str, str] | None = None, stdin: str | None = None) -> dict:
        """Run an agent subcommand; returns its JSON answer. Subcommands that write get
        `--root <install_dir>` (they refuse to write outside it); secrets go on `stdin`."""
        if self._agent_path is None:  # once per connection, not per step
            if self.transport.agent_path is None:
                self.transport.agent_path = self.ensure_input(AGENT_SOURCE, sha256_file(AGENT_SOURCE), ".py")
            self._agent_path = self.transport.agent_path
        def progress(line: str) -> None:
            if stream and not line.startswith("{"):  # the JSON answer is data, not progress
                stream(line)
        argv = [self.transport.python, self._agent_path, *self._agent_args(args)]
        extra = {"stdin": stdin} if stdin is not None else {}
        result = self.transport.run(argv, timeout=timeout, stream=progress if stream else None, check=False,
                                    env=env, **extra)
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        try:
            answer = json.loads(last)
        except ValueError:
            answer = None
        if result.exit_code == _ESCAPE:  # the agent refused a path outside the install_dir
            raise DeployError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                              else f"kiln agent `{args[0]}` refused a path outside {self.root}",
                              target=self.target,
                              hint="nothing was written; replace that symlink with a folder inside the install_dir")
        if answer is None or (check and result.exit_code not in (0, 3)):
            # the agent's own reason (a SystemExit message, "batch step 1 (activate): ..."), if it gave one
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
            what = f"kiln agent `{args[0]}`" + (f" ({reason[:300]})" if reason and len(reason) < 1000 else "")
            raise self.transport._fail(result, what,
                                       hint="see the output above; the device needs python3 (and numpy/onnxruntime for CPU engines)")
        return answer

    def _agent_args(self, args: Sequence[str]) -> list[str]:
        """A subcommand's arguments; one that writes gets `--root <install_dir>` first."""
        args = list(args)
        return [args[0], "--root", self.root, *args[1:]] if args and args[0] in WRITING_SUBCOMMANDS else args

    def agent_batch(self, steps: Sequence[tuple[Sequence[str], str | None]], timeout: float | None = None) -> list[dict]:
        """Several agent subcommands, (args, stdin) each, run in order by one agent process: one
        command on the device. Returns their answers; it stops after the first answer that is not
        ok (fewer answers than steps), and a step that fails or refuses fails the whole call like
        that subcommand alone (the steps before it took effect). Stdin stays stdin (secrets too)."""
        payload = [{"argv": self._agent_args(args), "stdin": stdin or ""} for args, stdin in steps]
        answer = self.agent("batch", stdin=json.dumps(payload) + "\n", timeout=timeout)
        return answer["results"]

    def ensure_inputs(self, wanted: Sequence[tuple[Path | None, str, str, str]], store: Store | None) -> list[str]:
        """Several content-addressed inputs, (local copy, sha256, suffix, store entry) each, on the
        device; their paths there. From a store that presigns URLs the device downloads every one it
        does not hold already in one agent call (each URL on its step's stdin); anything else, or a
        call that fails, goes input by input (`ensure_input`)."""
        remotes = [self.path(".kiln", "inputs", sha + suffix) for _, sha, suffix, _ in wanted]
        if len(wanted) > 1 and store is not None and hasattr(store, "presign_get") and not self.is_local:
            steps = [(("fetch", "--out", remote, "--sha256", sha, "--if-absent"), store.presign_get(entry) + "\n")
                     for remote, (_, sha, _, entry) in zip(remotes, wanted)]
            try:
                if len(self.agent_batch(steps)) == len(steps):
                    return remotes
            except KilnError as exc:
                log.warning("%s could not download its inputs from the store in one call (%s); one by one",
                            self.target, exc.message)
        return [self.ensure_input(local, sha, suffix, store=store, entry=entry) for local, sha, suffix, entry in wanted]

    def ensure_input(self, local: Path | None, sha256: str, suffix: str = "", *,
                     store: Store | None = None, entry: str | None = None) -> str:
        """Put a content-addressed input on the device once; returns its path there.

        With a store that presigns URLs (S3) and an `entry` name, the device
        downloads it straight from the store; otherwise the controller uploads `local`.
        """
        remote = self.path(".kiln", "inputs", sha256 + suffix)
        # one round trip: the inputs folder made (never through a link out of install_dir), and is
        # the input there with the right bytes (a truncated or altered copy is replaced)?
        exists, actual, free = self._prepare([self.path(".kiln", "inputs")], test_file=remote)
        if exists and actual == sha256:
            return remote
        if exists:
            log.warning("%s:%s does not match its sha256 (got %s); fetching it again", self.target, remote, actual)
        if not self.fetch_from_store(store, entry, remote, sha256):
            if local is None:
                raise TransportError(f"cannot get {entry} onto {self.target}", target=self.target,
                                     hint="the store offers no direct download and there is no local copy")
            self.check_space(Path(local).stat().st_size, free, self.path(".kiln", "inputs"))
            self.transport.put(local, remote, sha256=sha256)
        return remote

    # -- releases: staging and cleanup go through the agent (inside install_dir, no link out) --

    def stage_begin(self, model: str, key: str) -> dict:
        """A fresh, empty `<model>/releases/.staging-<key>`; {"staging", "free_bytes", "removed"}."""
        return self.agent("stage-begin", "--model-dir", self.path(model), "--release", key)

    def stage_commit(self, model: str, key: str) -> None:
        """`.staging-<key>` becomes `releases/<key>` by a rename."""
        self.agent("stage-commit", "--model-dir", self.path(model), "--release", key)

    def remove(self, path: str, check: bool = True) -> None:
        """Delete `path` inside install_dir (a link is unlinked, never followed)."""
        try:
            self.agent("remove", "--path", path)
        except KilnError:
            if check:
                raise
            log.warning("could not remove %s on %s", path, self.target)

    def copy(self, src: str, dst: str, sha256: str, move: bool = False) -> None:
        """Copy on the device, verified by sha256, into install_dir (`move`: rename `src`, which
        must be inside install_dir too, after checking its sha256)."""
        self.agent("copy", "--src", src, "--dst", dst, "--sha256", sha256, *(["--move"] if move else []))

    def clean_inputs(self, models: Sequence[str]) -> list[str]:
        """Remove dead runs' temp files and inputs the current/previous releases do not use."""
        return self.agent("clean-inputs", "--install-dir", self.root, *models).get("removed", [])

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
    def lock(self, owner: str, stale_after: float = 6 * 3600, grace: float = LOCK_GRACE):
        """Per-device lock so two deploys never interleave (kiln/device_side/agent.py `lock_take`):
        created complete (owner written, then renamed into place), taken over when stale (older
        than `stale_after`, its process gone on the same host, or ownerless for `grace` seconds),
        released only by its owner. Yields a DeviceLock: its `release_step()` lets the deploy's last
        agent call release it too (one command fewer); otherwise it is released here."""
        from kiln.device_side import agent as agent_module
        lock = self.path(".kiln", "lock")
        token = f"{owner}.{secrets.token_hex(8)}"
        info = {"owner": owner, "token": token, "since": time.time(), "pid": os.getpid(),
                "host": agent_module.host_id()}
        answer = self.agent("lock-take", "--path", lock, "--stale-after", str(stale_after), "--grace", str(grace),
                            stdin=json.dumps(info) + "\n")
        if not answer.get("taken"):
            held = answer.get("held") or {}
            age = answer.get("age")
            since = f"{age:.0f} s ago" if isinstance(age, (int, float)) else "no owner recorded yet"
            raise DeployError(f"target {self.target} is locked by another deploy ({held.get('owner', '?')}, "
                              f"{since})", target=self.target,
                              hint=f"wait for it to finish, or remove {lock} on the device if it died")
        held = DeviceLock(self.target, ("lock-release", "--path", lock, "--token", token))
        try:
            yield held
        finally:
            try:
                if not held.released:
                    held.released_by(self.agent(*held.step))
            except KilnError as exc:
                log.warning("could not release the deploy lock on %s: %s", self.target, exc.message)

    def release_states(self, models: Sequence[str]) -> tuple[dict[str, ReleaseState], dict[str, str]]:
        """Per model: current, previous, hold and the active manifest; plus the other folders of the
        install_dir that have an active release. One command, no agent (nothing is written)."""
        if self.is_local:  # read here, without a shell: a no-op run on this machine starts no process
            return parse_release_state(_local_release_state(self.root, models), models)
        result = self.transport.run(["sh", "-c", _RELEASE_STATE, "kiln-state", self.root, *models])
        return parse_release_state(result.stdout, models)

    def active_releases(self, models: Sequence[str]) -> dict[str, str | None]:
        """Which release each model has active on the device (one round trip, no agent)."""
        links = self.transport.read_links([self.path(m, "current") for m in models])
        return {m: posixpath.basename(link) if link else None for m, link in zip(models, links.values())}
