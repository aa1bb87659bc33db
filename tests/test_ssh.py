"""SSHTransport against real OpenSSH servers (the simulated fleet in tests/fleet), and the
same contract checks against LocalTransport (one runner contract, two transports)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.errors import AuthenticationFailed, CommandFailed, HostKeyError, TransportError, UnreachableError
from kiln.transports.base import Transport
from kiln.transports.lines import LineSink
from kiln.transports.local import LocalTransport
from kiln.transports.ssh import SSHTransport
from tests.fleet.sim import PROFILES

ECHO_ARGV = ["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]


def fingerprint_of(fleet, name: str) -> str:
    pub = fleet.devices[name].dir / "ssh_host_ed25519_key.pub"
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


# --------------------------------------------------------------------------- run

def test_argv_arrives_literally_and_nothing_executes(fleet, tmp_path):
    canary = tmp_path / "pwned"
    hostile = [f"x; touch {canary}", f"$(touch {canary})", f"`touch {canary}`", "it's", '"double"',
               "a\nb", "tab\there", "*", "~", "$HOME", "", " lead space", "-n", "--", "ünï ✓",
               f"| touch {canary}", f"&& touch {canary}", "\\", "'; touch " + str(canary) + "; '"]
    with fleet.transport("orin-01") as t:
        res = t.run(ECHO_ARGV + hostile)
    assert json.loads(res.stdout) == hostile
    assert res.exit_code == 0 and res.ok
    assert not canary.exists()
    assert res.command.startswith("python3 -c ")


def test_env_values_are_literal(fleet, tmp_path):
    canary = tmp_path / "pwned-env"
    value = f"a b; touch {canary} $(touch {canary}) 'q'"
    with fleet.transport("orin-01") as t:
        res = t.run(["sh", "-c", 'printf "%s" "$KILN_X"'], env={"KILN_X": value})
        assert res.stdout == value
        with pytest.raises(TransportError, match="invalid environment variable name"):
            t.run(["true"], env={"A;touch x": "1"})
    assert not canary.exists()


def test_exit_codes_result_and_command_failed(fleet):
    with fleet.transport("orin-01") as t:
        res = t.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert (res.exit_code, res.stdout, res.stderr) == (3, "out\n", "err\n")
        assert not res.ok
        with pytest.raises(CommandFailed) as info:
            t.run(["sh", "-c", "for i in $(seq 1 50); do echo line$i; done; echo boom >&2; exit 7"])
        err = info.value
        assert err.exit_code == 7
        assert err.command.startswith("sh -c ")
        assert "line50" in err.output_tail and "boom" in err.output_tail and "line1\n" not in err.output_tail
        assert "orin-01" in str(err) and "exit code: 7" in str(err)
        missing = t.run(["/no/such/binary", "x"], check=False)
        assert missing.exit_code == 127
        assert t.run(["true"]).exit_code == 0


def test_streaming_is_live(fleet):
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with fleet.transport("orin-01") as t:
        t.run(["true"])  # connect first: time only the command
        t0 = time.monotonic()
        res = t.run(["sh", "-c", "echo first; echo warn >&2; sleep 0.7; echo second"],
                    stream=lambda line: seen.append((time.monotonic() - t0, line)))
    done = time.monotonic() - t0
    lines = [line for _, line in seen]
    assert sorted(lines) == ["first", "second", "warn"]
    first = dict((line, ts) for ts, line in seen)["first"]
    assert first < done - 0.4, f"first line arrived at {first:.2f}s, run returned at {done:.2f}s"
    assert res.stdout == "first\nsecond\n" and res.stderr == "warn\n"


def test_timeout_kills_the_remote_command(fleet):
    marker = "31.4159"
    with fleet.transport("orin-01") as t:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="timed out after 1.0s") as info:
            t.run(["sh", "-c", f"echo started; sleep {marker}; echo never"], timeout=1.0)
        assert time.monotonic() - t0 < 3
        assert "orin-01" in str(info.value)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            left = [pid for pid in fleet.processes("orin-01") if marker in _cmdline(pid)]
            if not left:
                break
            time.sleep(0.05)
        assert not left, "the timed-out command still runs on the device"
        assert t.run(["echo", "still usable"]).stdout == "still usable\n"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- files

def test_put_get_round_trip_verified(fleet, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "engine.plan"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    remote = "/srv/kiln/releases/abc/engine.plan"
    with fleet.transport("orin-01") as t:
        assert t.put(src, remote) == sha
        assert t.put(src, remote, sha256=sha) == sha  # overwrite in place, verified
        on_device = fleet.srv("orin-01") / "kiln/releases/abc/engine.plan"
        assert on_device.read_bytes() == data
        assert [p.name for p in on_device.parent.iterdir()] == ["engine.plan"]  # no .part left
        back = tmp_path / "back" / "engine.plan"
        assert t.get(remote, back) == sha
        assert back.read_bytes() == data
        assert not [p for p in back.parent.iterdir() if p.name != "engine.plan"]
    assert not (fleet.srv("orin-02") / "kiln").exists()  # each device has its own /srv


def test_put_refuses_a_file_not_matching_its_digest(fleet, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"new bytes")
    remote = "/srv/kiln/digest/a.bin"
    with fleet.transport("orin-02") as t:
        t.put(src, remote)
        src.write_bytes(b"corrupted")
        with pytest.raises(TransportError, match="does not match its expected sha256") as info:
            t.put(src, remote, sha256=hashlib.sha256(b"new bytes").hexdigest())
        assert "orin-02" in str(info.value)
        folder = fleet.srv("orin-02") / "kiln/digest"
        assert (folder / "a.bin").read_bytes() == b"new bytes"  # previous file still in place
        assert [p.name for p in folder.iterdir()] == ["a.bin"]
        with pytest.raises(TransportError, match="does not exist on target orin-02"):
            t.get("/srv/kiln/digest/missing.bin", tmp_path / "missing.bin")
        assert not (tmp_path / "missing.bin").exists()
        assert not list(tmp_path.glob(".missing.bin.*"))


def test_put_keeps_file_mode(fleet, tmp_path):
    src = tmp_path / "tool.sh"
    src.write_text("#!/bin/sh\necho tool-ok\n")
    src.chmod(0o755)
    with fleet.transport("cpu-01") as t:
        t.put(src, "/srv/kiln/bin/tool.sh")
        assert t.run(["/srv/kiln/bin/tool.sh"]).stdout == "tool-ok\n"


def test_put_get_without_sha256sum_on_the_device(new_fleet, tmp_path):
    sim = new_fleet()
    sim.add_device("bare", replace(PROFILES["cpu"], name="no-sha256sum", hidden=("/usr/bin/sha256sum",)))
    sim.start()
    src = tmp_path / "m.onnx"
    src.write_bytes(b"onnx" * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    with sim.transport("bare", python="/usr/bin/python3") as t:
        assert t.run(["sh", "-c", "command -v sha256sum"], check=False).exit_code != 0
        assert t.put(src, "/srv/kiln/m.onnx", sha256=sha) == sha
        assert t.get("/srv/kiln/m.onnx", tmp_path / "back.onnx") == sha
    assert (tmp_path / "back.onnx").read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- host keys

def test_unknown_host_key_is_rejected_before_authentication(fleet, tmp_path):
    known = fleet.write_known_hosts(tmp_path / "known_hosts", names=["orin-02"])  # not orin-01
    before = fleet.logins("orin-01")
    t = fleet.transport("orin-01", known_hosts=known)
    with pytest.raises(HostKeyError) as info:
        t.run(["true"])
    msg = str(info.value)
    port = fleet.port("orin-01")
    assert "not known" in msg and "orin-01" in msg and f"127.0.0.1:{port}" in msg
    assert fingerprint_of(fleet, "orin-01") in msg
    assert f"ssh-keyscan -t ed25519 -p {port} 127.0.0.1 >> ~/.ssh/known_hosts" in msg
    assert not t.is_connected and t.connections_opened == 0
    time.sleep(0.2)
    assert fleet.logins("orin-01") == before, "no authentication may happen after a rejected key"
    assert known.read_text() == fleet.known_hosts(["orin-02"]), "known_hosts must never be written"


def test_changed_host_key_is_rejected(fleet, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts_line("orin-01", key_of="orin-02"))
    before = fleet.logins("orin-01")
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED") as info:
        fleet.transport("orin-01", known_hosts=known).run(["true"])
    msg = str(info.value)
    assert fingerprint_of(fleet, "orin-01") in msg and fingerprint_of(fleet, "orin-02") in msg
    assert f"ssh-keygen -R '[127.0.0.1]:{fleet.port('orin-01')}'" in msg
    assert fleet.logins("orin-01") == before


def test_default_known_hosts_come_from_ssh_config(fleet):
    with fleet.transport("orin-jp6") as t:  # UserKnownHostsFile in the fleet's ssh_config
        assert t.host_key_fingerprint is None
        assert t.run(["true"]).ok
        assert t.host_key_fingerprint == fingerprint_of(fleet, "orin-jp6")
    assert not t.is_connected


def test_proxy_jump_bastion_unknown_key_rejected(fleet, tmp_path):
    known = fleet.write_known_hosts(tmp_path / "known_hosts", names=["hidden-orin"])  # bastion missing
    before = (fleet.logins("bastion"), fleet.logins("hidden-orin"))
    with pytest.raises(HostKeyError) as info:
        fleet.transport("hidden-orin", known_hosts=known).run(["true"])
    msg = str(info.value)
    assert "proxy jump host bastion" in msg and f"127.0.0.1:{fleet.port('bastion')}" in msg
    assert fingerprint_of(fleet, "bastion") in msg
    time.sleep(0.2)
    assert (fleet.logins("bastion"), fleet.logins("hidden-orin")) == before


def test_proxy_jump_bastion_changed_key_rejected(fleet, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts_line("bastion", key_of="cpu-01") + fleet.known_hosts_line("hidden-orin"))
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED for proxy jump host bastion"):
        fleet.transport("hidden-orin", known_hosts=known).run(["true"])


def test_proxy_jump_target_key_checked_too(fleet, tmp_path):
    known = fleet.write_known_hosts(tmp_path / "known_hosts", names=["bastion"])  # target missing
    with pytest.raises(HostKeyError, match="host key of target hidden-orin is not known"):
        fleet.transport("hidden-orin", known_hosts=known).run(["true"])


def test_proxy_jump_with_known_keys_works(fleet, tmp_path):
    before = (fleet.logins("bastion"), fleet.logins("hidden-orin"))
    with fleet.transport("hidden-orin") as t:
        out = t.run(["cat", "/etc/nv_tegra_release"]).stdout
        t.run(["true"])
        assert out.startswith("# R35 (release), REVISION: 4.1")
        assert (t.connections_opened, t.hop_connections_opened) == (1, 1)
        assert len(fleet.processes("bastion")) > 1  # the listener + this connection's sshd
    assert fleet.wait_logins("bastion", before[0] + 1) == before[0] + 1
    assert fleet.wait_logins("hidden-orin", before[1] + 1) == before[1] + 1
    deadline = time.monotonic() + 3  # close() closed the bastion hop too: its sshd child exits
    while len(fleet.processes("bastion")) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fleet.processes("bastion")) == 1


def test_explicit_proxy_jump_argument(fleet, tmp_path):
    t = SSHTransport("hidden", "127.0.0.1", user="root", port=fleet.port("hidden-orin"),
                     identity_file=fleet.client_key, known_hosts=fleet.known_hosts_path,
                     proxy_jump=f"root@127.0.0.1:{fleet.port('bastion')}", connect_timeout=5,
                     ssh_config=fleet.ssh_config_path)
    with t:
        assert t.run(["cat", "/etc/nv_tegra_release"]).stdout.startswith("# R35")
        assert t.hop_connections_opened == 1


# --------------------------------------------------------------------------- reachability

def test_unreachable_device_fails_fast(new_fleet):
    sim = new_fleet()
    sim.add_device("gone", "cpu")
    sim.start()
    sim.make_unreachable("gone")
    t = sim.transport("gone", connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        t.run(["true"])
    assert time.monotonic() - t0 < 1.5
    msg = str(info.value)
    assert "gone" in msg and f"127.0.0.1:{sim.port('gone')}" in msg and "fix:" in msg


def test_unresponsive_device_times_out_at_connect_timeout(new_fleet):
    sim = new_fleet()
    sim.add_device("frozen", "cpu")
    sim.start()
    sim.freeze("frozen")
    t = sim.transport("frozen", connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        t.run(["true"])
    took = time.monotonic() - t0
    assert 0.8 < took < 3, took
    assert "frozen" in str(info.value)
    sim.thaw("frozen")
    with sim.transport("frozen") as t2:
        assert t2.run(["true"]).ok


def test_wrong_key_is_an_authentication_error(fleet, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    t = SSHTransport("orin-01", "127.0.0.1", user="root", port=fleet.port("orin-01"), identity_file=other,
                     known_hosts=fleet.known_hosts_path, allow_agent=False, connect_timeout=5)
    with pytest.raises(AuthenticationFailed, match="authentication as root failed on target orin-01"):
        t.run(["true"])


def test_reconnects_after_the_device_restarts(new_fleet):
    sim = new_fleet()
    sim.add_device("flaky", "orin-jp5")
    sim.start()
    with sim.transport("flaky") as t:
        assert t.run(["true"]).ok
        sim.stop_device("flaky")
        with pytest.raises(UnreachableError):
            t.run(["true"])
        sim.start_device("flaky")
        assert t.run(["cat", "/etc/nv_tegra_release"]).stdout.startswith("# R35")
        assert t.connections_opened == 2


# --------------------------------------------------------------------------- reuse

def test_one_connection_for_many_calls(fleet, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    before = fleet.logins("orin-02")
    with fleet.transport("orin-02") as t:
        for i in range(15):
            assert t.run(["echo", str(i)]).stdout == f"{i}\n"
        t.put(src, "/srv/kiln/reuse/f.bin")
        t.get("/srv/kiln/reuse/f.bin", tmp_path / "g.bin")
        assert t.connections_opened == 1
    time.sleep(0.1)
    assert fleet.logins("orin-02") - before == 1


def test_one_transport_shared_by_many_threads_opens_one_connection(fleet):
    """The run context keeps one transport per target and its tasks use it from many threads."""
    before = fleet.logins("xavier-01")
    errors: list[BaseException] = []
    with fleet.transport("xavier-01") as t:
        def work(i: int) -> None:
            try:
                assert t.run(["sh", "-c", f"sleep 0.05; echo {i}"]).stdout == f"{i}\n"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]  # > max_channels
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert t.connections_opened == 1
    assert not t.is_connected  # close() really closes
    time.sleep(0.1)
    assert fleet.logins("xavier-01") - before == 1


# --------------------------------------------------------------------------- device views

def test_each_device_sees_its_own_files(fleet):
    expect = {"orin-01": "# R35 (release), REVISION: 4.1", "orin-jp6": "# R36 (release), REVISION: 4.3",
              "xavier-01": "# R35 (release), REVISION: 4.1"}
    for name, head in expect.items():
        with fleet.transport(name) as t:
            assert t.run(["cat", "/etc/nv_tegra_release"]).stdout.startswith(head)
    with fleet.transport("xavier-01") as t:
        model = t.run(["cat", "/sys/firmware/devicetree/base/model"]).stdout
        assert model == "NVIDIA Jetson AGX Xavier Developer Kit\0"
    with fleet.transport("cpu-01") as t:
        res = t.run(["cat", "/etc/nv_tegra_release"], check=False)
        assert res.exit_code == 1 and "No such file" in res.stderr
    assert not Path("/etc/nv_tegra_release").exists()  # the host is untouched


def test_upgrade_rewrites_a_device_in_place(new_fleet):
    sim = new_fleet()
    sim.add_device("drift", "orin-jp5")
    sim.start()
    with sim.transport("drift") as t:
        head = ["sh", "-c", "head -1 /etc/nv_tegra_release; grep -h 'define NV_TENSORRT_MAJOR' "
                            "/usr/include/aarch64-linux-gnu/NvInferVersion.h; readlink -f /usr/include/cudnn_version.h"]
        before = t.run(head).stdout
        assert "R35" in before and "MAJOR 8 " in before and before.rstrip().endswith("cudnn_version_v8.h")
        sim.upgrade("drift", "orin-jp6")
        after = t.run(head).stdout
        assert "R36" in after and "MAJOR 10 " in after and after.rstrip().endswith("cudnn_version_v9.h")
        sim.upgrade("drift", "cpu")
        assert t.run(["test", "-e", "/usr/src/tensorrt/bin/trtexec"], check=False).exit_code == 1
        assert t.connections_opened == 1


def test_trtexec_wrapper_carries_the_device_environment(new_fleet, tmp_path):
    fake = tmp_path / "fake_trtexec_sim.py"
    fake.write_text("import os, sys\n"
                    "print(' '.join(sys.argv[1:]))\n"
                    "for k in ('KILN_SIM_TRT_VERSION', 'KILN_SIM_COMPUTE', 'KILN_SIM_GPU', 'KILN_SIM_STATE'):\n"
                    "    print(k + '=' + os.environ.get(k, '<unset>'))\n")
    sim = new_fleet(trtexec_sim=fake)
    sim.add_device("xav", "xavier-jp5")
    sim.add_device("jp6", "orin-jp6")
    sim.start()
    with sim.transport("xav") as t:
        out = t.run(["/usr/src/tensorrt/bin/trtexec", "--onnx=m.onnx", "--fp16"]).stdout.splitlines()
    assert out == ["--onnx=m.onnx --fp16", "KILN_SIM_TRT_VERSION=8.5.2.2", "KILN_SIM_COMPUTE=7.2",
                   "KILN_SIM_GPU=Xavier", f"KILN_SIM_STATE={sim.state_dir('xav')}"]
    with sim.transport("jp6") as t:
        out = t.run(["/usr/src/tensorrt/bin/trtexec"]).stdout
    assert "KILN_SIM_TRT_VERSION=10.3.0.30" in out and f"KILN_SIM_STATE={sim.state_dir('jp6')}" in out
    sim.upgrade("jp6", sim_env={"KILN_SIM_FAIL": "oom"})
    with sim.transport("jp6") as t:
        assert "KILN_SIM_GPU=Orin" in t.run(["/usr/src/tensorrt/bin/trtexec"]).stdout
        assert "export KILN_SIM_FAIL=oom" in t.run(["cat", "/usr/src/tensorrt/bin/trtexec"]).stdout


def test_devices_run_the_trtexec_simulator(fleet):
    if not (Path(__file__).parent / "fleet" / "trtexec_sim.py").exists():
        pytest.skip("tests/fleet/trtexec_sim.py not present")
    banners = {}
    for name in ("orin-01", "orin-jp6", "xavier-01"):
        with fleet.transport(name) as t:
            res = t.run(["/usr/src/tensorrt/bin/trtexec", "--help"], check=False)
        banners[name] = [line for line in res.stdout.splitlines() if line.startswith("&&&& RUNNING")][0]
    assert "[TensorRT v8502]" in banners["orin-01"] and "[TensorRT v8502]" in banners["xavier-01"]
    assert "[TensorRT v100300]" in banners["orin-jp6"]


def test_constructor_does_no_io():
    t = SSHTransport("nowhere", "203.0.113.1", ssh_config="/nonexistent/ssh_config", known_hosts="/nonexistent")
    assert not t.is_connected and t.connections_opened == 0
    with pytest.raises(TransportError, match="ssh config file /nonexistent/ssh_config does not exist"):
        t.run(["true"])


def test_reflashed_device_is_refused_until_known_hosts_is_updated(new_fleet, tmp_path):
    sim = new_fleet()
    sim.add_device("reflash", "orin-jp5")
    sim.start()
    old = sim.write_known_hosts(tmp_path / "old_known_hosts")
    with sim.transport("reflash", known_hosts=old) as t:
        assert t.run(["true"]).ok
    sim.rotate_host_key("reflash")
    with pytest.raises(HostKeyError, match="HOST KEY CHANGED for target reflash"):
        sim.transport("reflash", known_hosts=old).run(["true"])
    new = sim.write_known_hosts(tmp_path / "new_known_hosts")
    with sim.transport("reflash", known_hosts=new) as t:
        assert t.run(["true"]).ok


# --------------------------------------------------------------------------- local, same contract

@pytest.fixture(params=["local", "ssh"])
def any_transport(request, tmp_path) -> Transport:
    if request.param == "local":
        with LocalTransport("here") as t:
            yield t
        return
    with request.getfixturevalue("fleet").transport("cpu-01") as t:
        yield t


def test_contract_run_stream_and_failure(any_transport, tmp_path):
    t = any_transport
    hostile = ["$(touch x)", "a b", "it's", "ünï ✓", ""]
    assert json.loads(t.run(ECHO_ARGV + hostile).stdout) == hostile
    seen: list[str] = []
    res = t.run(["sh", "-c", "printf 'a\\nb'; printf 'e\\377\\n' >&2; exit 4"], check=False,
                stream=seen.append)
    assert (res.exit_code, res.stdout, res.stderr) == (4, "a\nb", "e\ufffd\n")
    assert sorted(seen) == ["a", "b", "e\ufffd"]
    with pytest.raises(CommandFailed) as info:
        t.run(["sh", "-c", "echo nope >&2; exit 9"])
    assert info.value.exit_code == 9 and "nope" in info.value.output_tail


def test_contract_stdin_is_fed_then_closed(any_transport):
    """`stdin` reaches the command's standard input (then end-of-file); without it, EOF at once."""
    t = any_transport
    read = ["python3", "-c", "import sys; print(repr(sys.stdin.read()))"]
    secret = "https://bucket/x?X-Amz-Signature=abc&X-Amz-Credential=k%2Fy 'q' $(true)\nsecond line\n"
    assert t.run(read, stdin=secret).stdout.strip() == repr(secret)
    assert t.run(read).stdout.strip() == repr("")
    assert t.run(read, stdin="").stdout.strip() == repr("")
    assert t.run(["true"], stdin="x" * 100000).ok  # a command that reads nothing does not block it
    assert "Signature" not in t.run(["sh", "-c", "cat >/dev/null; echo done"], stdin=secret).command


def test_contract_timeout_kills_children_too(any_transport):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="timed out after 0.5s"):
        # the shell forks sleep, which holds the output pipes: it must die with the shell
        any_transport.run(["sh", "-c", "sleep 30; echo never"], timeout=0.5)
    assert time.monotonic() - t0 < 3


def test_contract_put_get_verified_and_atomic(any_transport, fleet_or_local_root, tmp_path):
    t, root = any_transport, fleet_or_local_root(any_transport)
    src = tmp_path / "tool.sh"
    src.write_text("#!/bin/sh\necho ok\n")
    src.chmod(0o750)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    remote = f"{root}/kiln/contract/tool.sh"
    assert t.put(src, remote, sha256=sha) == sha
    assert t.run([remote]).stdout == "ok\n"  # mode kept
    src.write_text("changed")
    with pytest.raises(TransportError, match="does not match its expected sha256"):
        t.put(src, remote, sha256=sha)
    back = tmp_path / "back" / "tool.sh"
    assert t.get(remote, back) == sha  # the previous file is still in place
    assert back.read_text() == "#!/bin/sh\necho ok\n"
    assert [p.name for p in back.parent.iterdir()] == ["tool.sh"]
    with pytest.raises(TransportError, match="does not exist on target"):
        t.get(f"{root}/kiln/contract/missing", tmp_path / "back" / "missing")
    assert [p.name for p in back.parent.iterdir()] == ["tool.sh"]
    with pytest.raises(TransportError, match="no such local file"):
        t.put(tmp_path / "absent", remote)


@pytest.fixture
def fleet_or_local_root(tmp_path):
    return lambda t: str(tmp_path / "local-root") if isinstance(t, LocalTransport) else "/srv"


def test_line_sink_splits_decodes_and_takes_the_pid_mark_out():
    seen: list[str] = []
    sink = LineSink(seen.append, pid_mark="\x1epid:")
    for chunk in (b"\x1epid:4", b"2\nfir", b"st\n\xc3", b"\xa9t\xc3\xa9\n", b"last"):
        sink.feed(chunk)
    assert seen == ["first", "\u00e9t\u00e9"]  # a character split across chunks; "last" not yet
    sink.close()
    assert seen == ["first", "\u00e9t\u00e9", "last"]
    assert sink.pid == 42 and sink.text == "first\n\u00e9t\u00e9\nlast"


def test_read_links_is_the_same_locally_and_over_ssh(fleet, tmp_path):
    """One contract: where each symlink points, None for a plain file or a missing path."""
    from kiln.transports.local import LocalTransport
    with fleet.transport("cpu-01") as ssh:
        root = f"/srv/kiln-links-{tmp_path.name}"
        ssh.run(["sh", "-c", 'mkdir -p "$1/a b" && ln -sfn "releases/k 1" "$1/a b/current" && touch "$1/file"',
                 "x", root])
        paths = [f"{root}/a b/current", f"{root}/file", f"{root}/missing"]
        remote = ssh.read_links(paths)
    local_root = tmp_path / "links"
    (local_root / "a b").mkdir(parents=True)
    (local_root / "a b" / "current").symlink_to("releases/k 1")
    (local_root / "file").touch()
    local = LocalTransport().read_links([f"{local_root}/a b/current", f"{local_root}/file", f"{local_root}/missing"])
    assert list(remote.values()) == list(local.values()) == ["releases/k 1", None, None]


def test_timeout_holds_when_the_command_exited_but_a_child_keeps_the_output_open(fleet):
    """The exit status arrives but EOF never does (a background child holds the pipe):
    the deadline is still enforced (it used to loop forever)."""
    marker = "27.1828"
    with fleet.transport("cpu-01") as t:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="timed out after 2"):
            t.run(["sh", "-c", f"sleep {marker} & exit 0"], timeout=2)
        assert time.monotonic() - t0 < 6
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            left = [pid for pid in fleet.processes("cpu-01") if marker in _cmdline(pid)]
            if not left:
                break
            time.sleep(0.05)
        assert not left, "the background child still runs on the device"
        assert t.run(["echo", "ok"]).stdout == "ok\n"
