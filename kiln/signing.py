"""Provenance of engines: manifests signed by the controller that verified the engine.

An engine is built and verified on a device; the controller that drove the build signs
what it verified (the manifest: key inputs, sha256 of the bytes, ...) with its Ed25519
key before the manifest is created in the store. Every use of a stored manifest checks
the signature against the trusted public keys: `[signing] trusted` in the fleet file,
plus this controller's own key (so a single controller and `make demo` need no setup).

Format, inside the manifest:

    "signature": {"key": "ed25519:<base64 of the 32-byte raw public key>",
                  "sig": "<base64 of the 64-byte Ed25519 signature>"}

The signed bytes are `SIGNED_PREFIX` + `canonical_json(manifest without "signature")`
(kiln.keys.canonical_json: sorted keys, no whitespace), so any change to any field
(sha256, blob, key inputs...) breaks the signature. The prefix separates these
signatures from anything else the key might ever sign.

The private key is a PEM (PKCS#8, unencrypted) file, mode 0600, created on the first
publish if missing (`[signing] key`, default `<artifacts>/keys/signing.key`). Nothing
here is imported at fleet-load time except the key id syntax check (no cryptography
import for `doit list`).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kiln.errors import BuildError
from kiln.keys import canonical_json

KEY_ID_PREFIX = "ed25519:"
SIGNED_PREFIX = b"enginekiln engine manifest v1\n"
_KEY_ID_RE = re.compile(r"ed25519:[A-Za-z0-9+/]{43}=")


class SigningKeyError(BuildError):
    """The controller's signing key file cannot be read, parsed or created."""


class UntrustedEngine(BuildError):
    """A stored engine manifest is not signed by a trusted key: the engine is not used."""


# -- key ids ---------------------------------------------------------------------------

def key_id_problem(value: object) -> str | None:
    """Why `value` is not a public key id (`ed25519:<base64 of 32 bytes>`), or None. Syntax only."""
    if not isinstance(value, str) or not _KEY_ID_RE.fullmatch(value):
        return (f"{value!r} is not a public key id: expected 'ed25519:' followed by the base64 of the "
                "32-byte raw public key (44 characters ending in '=')")
    try:
        raw = base64.b64decode(value[len(KEY_ID_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return f"{value!r}: the part after 'ed25519:' is not valid base64"
    if len(raw) != 32:
        return f"{value!r}: an Ed25519 public key is 32 bytes, this is {len(raw)}"
    return None


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives import serialization
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + base64.b64encode(raw).decode()


def public_key_of(kid: str):
    """The Ed25519 public key a key id names (ValueError if it names none)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    problem = key_id_problem(kid)
    if problem:
        raise ValueError(problem)
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(kid[len(KEY_ID_PREFIX):]))


# -- the private key ---------------------------------------------------------------------

def load_private_key(path: Path):
    """The Ed25519 private key in `path`, or None if the file does not exist."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}", file=str(path),
                              hint="fix its permissions, or point [signing] key at a readable file") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the signing key {path} is not an unencrypted PEM private key", file=str(path),
                              hint="restore it from your backup, or move it away to have a new key created "
                                   "(engines it signed are then trusted only where its key id is listed)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {path} is not an Ed25519 key", file=str(path),
                              hint="enginekiln signs with Ed25519 keys; move this file away to have one created")
    return key


def create_private_key(path: Path):
    """Create an Ed25519 key in `path` (mode 0600, folder 0700 when created), unless another
    process just did: the file appears whole (written aside, then hard-linked) and the key in
    force is returned. Returns (key, created)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    except OSError as exc:
        raise SigningKeyError(f"cannot create the signing key {path}: {exc.strerror}", file=str(path),
                              hint="make its folder writable, or point [signing] key at a writable path") from exc
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return (key, True) if created else (load_private_key(path), False)


# -- signing and verifying -------------------------------------------------------------------

def signed_bytes(manifest: dict) -> bytes:
    return SIGNED_PREFIX + canonical_json({k: v for k, v in manifest.items() if k != "signature"}).encode()


def sign_manifest(manifest: dict, private_key) -> dict:
    """A copy of `manifest` with its signature (any previous one replaced)."""
    sig = private_key.sign(signed_bytes(manifest))
    return {**{k: v for k, v in manifest.items() if k != "signature"},
            "signature": {"key": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}}


@dataclass(frozen=True)
class Verdict:
    status: str            # trusted | untrusted (valid, by a key not trusted) | invalid | unsigned
    signed_by: str | None  # the key id the manifest names, if any

    @property
    def ok(self) -> bool:
        return self.status == "trusted"

    def describe(self) -> str:
        if self.status == "unsigned":
            return "unsigned"
        if self.status == "untrusted":
            return f"signed by {self.signed_by}, which is not trusted here"
        if self.signed_by:
            return f"its signature by {self.signed_by} does not verify: the manifest was changed after signing"
        return "its signature is malformed"


def verify_manifest(manifest: dict, trusted: Iterable[str]) -> Verdict:
    """Check the manifest's signature. A signature that verifies under the key it names is
    `trusted` iff that key id is in `trusted`, else `untrusted`; one that does not verify is
    `invalid`, whoever's key it names."""
    from cryptography.exceptions import InvalidSignature
    signature = manifest.get("signature")
    if signature is None:
        return Verdict("unsigned", None)
    if not isinstance(signature, dict) or not isinstance(signature.get("key"), str) \
            or not isinstance(signature.get("sig"), str):
        return Verdict("invalid", None)
    kid = signature["key"]
    try:
        public = public_key_of(kid)
        sig = base64.b64decode(signature["sig"], validate=True)
    except (ValueError, binascii.Error):
        return Verdict("invalid", kid if key_id_problem(kid) is None else None)
    try:
        public.verify(sig, signed_bytes(manifest))
    except InvalidSignature:
        return Verdict("invalid", kid)
    return Verdict("trusted" if kid in set(trusted) else "untrusted", kid)


class Trust:
    """One controller's view, once per run: its key (loaded when it exists, created on the first
    signature) and the key ids it trusts (its own always among them)."""

    def __init__(self, key_path: Path, trusted: Iterable[str] = ()) -> None:
        self.key_path = Path(key_path)
        self.listed = tuple(trusted)
        self._key = None
        self._loaded = False
        self._lock = threading.Lock()

    def _own(self, create: bool, say=print):
        with self._lock:
            if not self._loaded or (self._key is None and create):
                self._key = load_private_key(self.key_path)
                self._loaded = True
                if self._key is None and create:
                    self._key, created = create_private_key(self.key_path)
                    if created:
                        say(f"enginekiln: created signing key {self.key_path}; its public key id is "
                            f"{key_id(self._key.public_key())} (list it in [signing] trusted to trust "
                            "engines this controller publishes elsewhere)")
            return self._key

    def own_key_id(self) -> str | None:
        """This controller's key id, or None if it has no key yet (nothing is created)."""
        key = self._own(create=False)
        return key_id(key.public_key()) if key is not None else None

    def trusted(self) -> tuple[str, ...]:
        own = self.own_key_id()
        return self.listed + ((own,) if own and own not in self.listed else ())

    def verdict(self, manifest: dict) -> Verdict:
        return verify_manifest(manifest, self.trusted())

    def sign(self, manifest: dict, say=print) -> dict:
        return sign_manifest(manifest, self._own(create=True, say=say))


def controller_trust(ctx) -> Trust:
    """The run's Trust (a kiln.pipeline.context.Context: once per run)."""
    fleet = ctx.fleet
    path = getattr(fleet, "signing_key", None) or fleet.artifacts / "keys" / "signing.key"
    return ctx.once(("signing",), lambda: Trust(path, getattr(fleet, "trusted", ())))
