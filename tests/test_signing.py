"""Provenance: engines in the store are signed; deploy refuses what no trusted key signed.

Real store folders shared by real checkouts, real `doit` runs (tests/kiln_project.py). A second
checkout has its own controller key (in its own artifacts/), so it trusts the first one's
engines only once the first key is listed in its `[signing] trusted`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from kiln_project import Project
from kiln.errors import ConfigError
from kiln.signing import (Trust, key_id, key_id_problem, load_private_key, sign_manifest, verify_manifest)
from kiln.stores.base import blob_entry, engine_manifest_entry, quarantine_entry
from kiln.stores.local import LocalStore


class Checkout(Project):
    """A checkout whose store is a shared folder; `trusted` goes into its [signing] table."""

    def __init__(self, root: Path, store: Path, trusted: list[str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.store_root = store
        super().__init__(root, extra=f'\n[store]\nurl = "file://{store}"\n')
        self.base_text = self.fleet.read_text()
        if trusted is not None:
            self.trust(trusted)

    def trust(self, ids: list[str]) -> None:
        self.fleet.write_text(self.base_text + f"\n[signing]\ntrusted = {json.dumps(ids)}\n")

    @property
    def store(self) -> LocalStore:
        return LocalStore(self.store_root)

    def key_id(self) -> str:
        return key_id(load_private_key(self.artifacts / "keys" / "signing.key").public_key())

    def engine_record(self) -> dict:
        return json.loads(next((self.artifacts / "engines").glob("tiny@*.json")).read_text())

    def manifest(self, key: str) -> dict:
        return json.loads(self.store.get_bytes(engine_manifest_entry(key)))

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def cache_rows(self) -> list[dict]:
        run = self.doit("cache-check", "--json", check=False)
        return json.loads(run.out[run.out.index("{"):run.out.rindex("}") + 1])["engines"]


def failed_lines(run) -> list[str]:
    return [l for l in run.out.splitlines() if l.startswith("  FAILED  deploy:local: ")]


# -- 1. a signed publish; another controller refuses it until it trusts the key ---------------------

def test_a_second_controller_refuses_an_engine_it_does_not_trust_until_it_trusts_the_key(tmp_path):
    store = tmp_path / "shared-store"
    a = Checkout(tmp_path / "a", store)
    run = a.doit("deploy:local")
    key_file = a.artifacts / "keys" / "signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    a_id = a.key_id()
    assert re.search(rf"created signing key {re.escape(str(key_file))}; its public key id is {re.escape(a_id)}",
                     run.out), run.out
    key = a.engine_record()["key"]
    manifest = a.manifest(key)
    assert manifest["signature"]["key"] == a_id
    assert verify_manifest(manifest, [a_id]).ok
    assert a.active() == key

    b = Checkout(tmp_path / "b", store)
    run = b.doit("deploy:local", check=False)
    assert run.returncode != 0, run.out
    assert "Traceback" not in run.out, run.out
    (failed,) = failed_lines(run)
    assert f"engine {key[:12]} in file://{store} is not signed by a trusted key (signed by {a_id})" in failed, run.out
    assert f"add {a_id} to [signing] trusted" in run.out, run.out
    assert b.active() is None  # nothing activated
    assert "build" not in b.kinds() and "cache-hit" not in b.kinds()
    assert b.manifest(key) == manifest  # left in place: trusting its key makes it a hit
    rows = b.cache_rows()
    assert rows[0]["status"] == "miss" and rows[0]["why"].startswith("untrusted"), rows

    b.trust([a_id])
    assert b.cache_rows()[0]["status"] == "hit"
    run = b.doit("deploy:local")
    assert list(run.engines().values()) == ["cache-hit"], run.out
    assert "build" not in b.kinds() and "publish" not in b.kinds(), b.events()
    assert b.active() == key == a.active()
    assert b.manifest(key) == manifest and not (store / "quarantine").exists()


def test_an_engine_still_untrusted_on_the_next_run_is_quarantined_and_rebuilt(tmp_path):
    store = tmp_path / "shared-store"
    a = Checkout(tmp_path / "a", store)
    a.doit("deploy:local")
    key, a_id = a.engine_record()["key"], a.key_id()

    b = Checkout(tmp_path / "b", store)
    assert b.doit("deploy:local", check=False).returncode != 0
    run = b.doit("deploy:local")  # still not trusted: moved aside, rebuilt and signed by b
    assert "build" in b.kinds() and "publish" in b.kinds(), run.out
    assert b.active() == key
    moved = store / quarantine_entry(engine_manifest_entry(key))
    assert json.loads(moved.read_text())["signature"]["key"] == a_id
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert reason["reason"] == "not signed by a trusted key" and reason["signed_by"] == a_id
    assert b.manifest(key)["signature"]["key"] == b.key_id() != a_id


# -- 2. a foreign engine planted in the store before any build --------------------------------------

def test_a_planted_unsigned_engine_is_refused_quarantined_and_rebuilt(tmp_path):
    store = tmp_path / "shared-store"
    p = Checkout(tmp_path / "p", store)
    p.doit("export")
    p.doit("fingerprint")
    (row,) = p.cache_rows()
    assert row["status"] == "miss"
    key = row["key"]

    evil = b"not an engine you want on your robot"
    sha = hashlib.sha256(evil).hexdigest()
    s = p.store
    src = tmp_path / "evil"
    src.write_bytes(evil)
    s.put_file(blob_entry(sha), src, sha256=sha)
    assert s.put_bytes(engine_manifest_entry(key),
                       json.dumps({"key": key, "sha256": sha, "blob": blob_entry(sha)}).encode())

    (row,) = p.cache_rows()  # a miss, and cache-check moved nothing
    assert row["status"] == "miss" and row["why"].startswith("unsigned"), row
    assert s.info(engine_manifest_entry(key)) is not None and not (store / "quarantine").exists()

    run = p.doit("deploy:local", check=False)
    assert run.returncode != 0 and "Traceback" not in run.out, run.out
    (failed,) = failed_lines(run)
    assert f"engine {key[:12]} in file://{store} is not signed by a trusted key (unsigned)" in failed, run.out
    assert p.active() is None
    releases = p.root / "deploy" / "tiny" / "releases"
    assert not releases.exists() or not list(releases.iterdir())
    moved = store / quarantine_entry(engine_manifest_entry(key))
    assert json.loads(moved.with_name(moved.name + ".reason.json").read_text())["reason"] == \
        "not signed by a trusted key"

    run = p.doit("deploy:local")  # the next run rebuilds it, signed
    assert p.active() == key
    assert p.engine_record()["sha256"] != sha
    assert p.manifest(key)["signature"]["key"] == p.key_id()
    assert p.cache_rows()[0]["status"] == "hit"


def test_a_signed_manifest_copied_under_another_key_is_not_that_engine(tmp_path):
    """A trusted, validly signed manifest answers only for the key it names: copied into the place
    of another engine (a replay of an old engine for new weights), it is a miss for cache-check,
    is quarantined by the deploy, and the right engine is built."""
    store = tmp_path / "shared-store"
    p = Checkout(tmp_path / "p", store)
    p.doit("deploy:local")
    old_key = p.active()
    old = p.store.get_bytes(engine_manifest_entry(old_key))

    from test_fleet import retrain
    retrain(p, 0.01)  # new weights: a new engine key
    p.doit("export")
    (row,) = p.cache_rows()
    new_key = row["key"]
    assert new_key != old_key and row["status"] == "miss"
    assert p.store.put_bytes(engine_manifest_entry(new_key), old)  # the old engine's signed manifest
    (row,) = p.cache_rows()
    assert row["status"] == "miss" and row["why"].startswith("misplaced") and old_key[:12] in row["why"], row

    p.doit("deploy:local")
    assert p.active() == new_key
    assert p.manifest(new_key)["key"] == new_key and p.engine_record()["key"] == new_key
    moved = store / quarantine_entry(engine_manifest_entry(new_key))
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert reason["names_key"] == old_key and "another engine key" in reason["reason"]
    assert p.cache_rows()[0]["status"] == "hit"


# -- 3. a field changed after signing ----------------------------------------------------------------

def test_a_manifest_changed_after_signing_fails_verification(tmp_path):
    trust = Trust(tmp_path / "keys" / "signing.key")
    assert trust.own_key_id() is None and not (tmp_path / "keys").exists()  # nothing created by reading
    said = []
    signed = trust.sign({"key": "k" * 64, "sha256": "a" * 64, "blob": blob_entry("a" * 64)}, say=said.append)
    own = trust.own_key_id()
    assert own and said and own in said[0]
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert key_id_problem(own) is None and signed["signature"]["key"] == own
    assert trust.verdict(signed).ok  # the own key is always trusted

    altered = {**signed, "sha256": "b" * 64}
    verdict = trust.verdict(altered)
    assert verdict.status == "invalid" and verdict.signed_by == own and not verdict.ok
    assert "changed after signing" in verdict.describe()
    assert not trust.verdict({k: v for k, v in signed.items() if k != "signature"}).ok  # unsigned
    assert verify_manifest(signed, []).status == "untrusted"  # valid, but nobody trusts that key
    resigned = sign_manifest(altered, load_private_key(tmp_path / "keys" / "signing.key"))
    assert trust.verdict(resigned).ok


def test_a_changed_signed_manifest_in_the_store_is_a_miss_for_cache_check(tmp_path):
    """Through a real store and the real cache-check: the same alteration, seen by CI."""
    store = tmp_path / "shared-store"
    p = Checkout(tmp_path / "p", store)
    p.doit("export")
    p.doit("fingerprint")
    (row,) = p.cache_rows()
    key, data = row["key"], os.urandom(100)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "blob").write_bytes(data)
    p.store.put_file(blob_entry(sha), tmp_path / "blob", sha256=sha)
    trust = Trust(p.artifacts / "keys" / "signing.key")  # this controller's own key
    signed = trust.sign({"key": key, "sha256": sha, "blob": blob_entry(sha)}, say=lambda _: None)
    p.store.put_bytes(engine_manifest_entry(key), json.dumps({**signed, "size": 1}).encode())
    (row,) = p.cache_rows()
    assert row["status"] == "miss" and "changed after signing" in row["why"], row
    p.store.put_bytes(engine_manifest_entry(key), json.dumps(signed).encode(), overwrite=True)
    assert p.cache_rows()[0]["status"] == "hit"


# -- 4. the fleet file ------------------------------------------------------------------------------

def test_a_malformed_trusted_key_id_is_a_config_error_at_its_line(tmp_path):
    from kiln.config import load_fleet
    good = key_id(load_private_key_or_new(tmp_path).public_key())
    path = tmp_path / "targets.toml"
    path.write_text(textwrap.dedent(f"""\
        [models.tiny]
        factory = "examples.tiny_detector:build_model"
        checkpoint = "ckpt/tiny.pt"
        inputs = {{ pixel_values = [1, 3, 32, 32] }}
        outputs = ["logits"]

        [signing]
        key = "keys/controller.key"
        trusted = ["{good}", "ed25519:not-a-key"]

        [targets.local]
        models = ["tiny"]
        install_dir = "deploy"
        """))
    with pytest.raises(ConfigError) as info:
        load_fleet(path, tmp_path / "artifacts")
    text = str(info.value)
    assert f"{path}:9: signing.trusted:" in text and "'ed25519:not-a-key'" in text, text
    path.write_text(path.read_text().replace(', "ed25519:not-a-key"', ""))
    fleet = load_fleet(path, tmp_path / "artifacts")
    assert fleet.trusted == (good,) and fleet.signing_key == tmp_path / "keys" / "controller.key"


def load_private_key_or_new(tmp_path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    return Ed25519PrivateKey.generate()
