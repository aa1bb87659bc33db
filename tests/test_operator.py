"""Operators' control, for real on a local target: status reads the device, rollback holds,
unpin and a new engine end the hold, pins in the fleet file, models that leave a target."""
from __future__ import annotations

import os

import pytest

from kiln_project import Project, python


def retrain(p: Project, model: str = "tiny", delta: float = 0.01) -> None:
    ckpt = str(p.checkpoint(model))
    python(f"import torch; sd = torch.load({ckpt!r}, weights_only=True);"
           f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + {delta}; torch.save(sd, {ckpt!r})")


def status(p: Project, *extra: str) -> dict[tuple[str, str], dict]:
    code, document, stderr = p.doit_json("status", "--json", *extra)
    assert code == 0, stderr
    return {(r["target"], r["model"]): r for r in document["rows"]}


def switch_by_hand(p: Project, model: str, key: str) -> None:
    link = p.root / "deploy" / model / "current"
    tmp = link.with_name(".by-hand")
    os.symlink(f"releases/{key}", tmp)
    os.rename(tmp, link)


@pytest.fixture
def released(tmp_path):
    """A project whose device holds two releases of `tiny`: (old, new), new active."""
    p = Project(tmp_path, models={"tiny": 1, "other": 2})
    p.doit("deploy:local")
    old = p.active()
    retrain(p)
    p.doit("deploy:local")
    new = p.active()
    assert old and new and old != new and p.previous() == old
    return p, old, new


def test_rollback_holds_through_a_noop_deploy_until_unpin_or_a_new_engine(released):
    p, old, new = released
    run = p.doit("rollback:local", "--model", "tiny")
    assert p.active() == old and p.previous() == new
    row = status(p)[("local", "tiny")]
    assert row["state"] == "rolled back" and row["active"] == old and row["wanted"] == new, row
    assert status(p)[("local", "other")]["state"] == "up to date"

    run = p.doit("deploy:local")  # the hold survives a no-op deploy
    assert run.ran() == set(), run.out
    assert p.active() == old
    assert any(e["event"] == "rollback" and e["target"] == "local" and e["key"] == old for e in p.events())

    refused = p.doit("rollback:local", "--model", "tiny", check=False)
    assert refused.returncode == 1 and "already rolled back" in refused.out and p.active() == old

    p.doit("unpin:local")
    assert status(p)[("local", "tiny")]["state"] == "pending"
    run = p.doit("deploy:local")
    assert p.active() == new and "staging tiny" not in run.out  # still on the device: switched, not re-sent
    assert status(p)[("local", "tiny")]["state"] == "up to date"

    other = p.active("other")
    refused = p.doit("rollback:local", check=False)  # all models: `other` has nowhere to go back to
    assert refused.returncode == 1 and "other has no previous release" in refused.out
    assert p.active() == new and p.active("other") == other  # all or nothing: nothing was changed
    p.doit("rollback:local", "--model", "tiny")
    assert p.active() == old
    retrain(p, delta=0.02)  # a new engine ends the hold
    p.doit("deploy:local")
    newest = p.active()
    assert newest not in (old, new)
    assert not (p.root / "deploy" / "tiny" / "hold.json").exists()
    assert status(p)[("local", "tiny")]["state"] == "up to date"


def test_status_reads_the_device_pins_hold_and_a_removed_model_is_deactivated(released):
    p, old, new = released
    fleet = p.fleet.read_text()
    p.fleet.write_text(fleet + 'pin = { tiny = "abcdef0123" }\n')
    run = p.doit("deploy:local", check=False)
    assert run.returncode == 1 and "pinned to 'abcdef0123'" in run.out and p.active() == new
    p.fleet.write_text(fleet + 'pin = { tiny = "nothex" }\n')
    bad = p.doit("list", check=False)
    assert bad.returncode == 2 and "targets.local.pin" in bad.out and "hex" in bad.out
    p.fleet.write_text(fleet)

    switch_by_hand(p, "tiny", old)
    live, offline = status(p)[("local", "tiny")], status(p, "--offline")[("local", "tiny")]
    assert live["state"] == "differs from wanted" and live["active"] == old, live
    assert offline["state"] == "up to date" and offline["source"] == "records"  # what the records believe
    assert "differs from wanted" in p.doit("status").out

    p.fleet.write_text(fleet + f'pin = {{ tiny = "{old[:10]}" }}\n')
    p.doit("deploy:local")
    assert p.active() == old
    row = status(p)[("local", "tiny")]
    assert row["state"] == "pinned" and row["pinned"] == old[:10]
    assert p.doit("deploy:local").ran() == set()  # the pin survives a no-op deploy

    p.fleet.write_text(fleet.replace('models = ["tiny", "other"]', 'models = ["tiny"]'))
    other = p.active("other")
    rows = status(p)
    assert rows[("local", "other")]["state"] == "removed" and rows[("local", "other")]["active"] == other
    p.doit("deploy:local")
    assert p.active() == new  # the pin is gone with the edit
    assert p.active("other") is None and p.previous("other") == other  # deactivated, release kept
    assert any(e.get("action") == "deactivate" and e["key"] == other for e in p.events())
    assert ("local", "other") not in status(p)
    assert p.doit("deploy:local").ran() == set()



def test_an_activation_that_fails_part_way_rolls_back_the_models_already_switched(tmp_path):
    """The switch of every model and the clean-up run as one agent call; when the second model's
    activation fails (here its staged release is gone by then), the first model is switched back:
    all or nothing, and the run says so."""
    import json

    p = Project(tmp_path, models={"tiny": 1, "other": 2})
    p.doit("deploy:local")
    before = {m: p.active(m) for m in ("tiny", "other")}
    retrain(p, "tiny")
    retrain(p, "other")
    # the busy check runs after staging, just before the switch: it removes other's new release
    releases = p.root / "deploy" / "other" / "releases"
    sabotage = f'for d in {releases}/*; do [ "${{d##*/}}" = "{before["other"]}" ] || rm -rf "$d"; done; true'
    text = p.fleet.read_text()
    assert text.count("[targets.local]\n") == 1
    p.fleet.write_text(text.replace("[targets.local]\n", f"[targets.local]\nbusy_check = {json.dumps(sabotage)}\n"))
    run = p.doit("deploy:local", check=False)
    assert run.returncode == 1, run.out
    assert "activation failed on local" in run.out and "rolled back to the previous releases" in run.out, run.out
    assert "(activate): release " in run.out and "is not staged" in run.out, run.out   # the agent's reason
    assert {m: p.active(m) for m in ("tiny", "other")} == before
    assert not (p.root / "deploy" / ".kiln" / "lock").exists()
