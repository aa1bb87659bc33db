"""Cold and retrain paths against a hand-written Ansible two-stage pipeline (simulated Orins).

    .venv/bin/python bench/bench_lean.py [--runs N] [--devices 3] [--build-seconds 2] [--timing-cache]

One fleet of --devices simulated Orins of one class (real sshd each, tests/fleet/sim.py; trtexec
builds take --build-seconds), one moto S3 server on loopback, one checkpoint of the tiny model.
Each round, in one process:
  1. enginekiln cold: a fresh project (empty artifacts, an empty S3 store prefix, a fresh
     install_dir on the devices), `doit -n 4 deploy:orins`;
  2. Ansible cold: bench/ansible/export_upload.py (torch export, onnx.checker, upload to S3,
     presigned URL) then `ansible-playbook bench/ansible/deploy.yml` (each device downloads the
     ONNX, builds with trtexec, checks the engine with a trtexec load, switches a symlink), into a
     fresh folder on the devices;
  3. new weights (same graph) into both checkpoints;
  4. enginekiln retrain: `doit -n 4 deploy:orins`;  5. Ansible retrain: the same two stages.
Same network, same weights, same devices, same S3 server. Printed: medians and ranges of each
path with the controller's CPU time (this process's children: doit and its export child; stage 1
and ansible-playbook with their ssh clients), the ratios enginekiln / Ansible (median of the
per-round ratios and their range), engine
builds counted on the devices, and the SSH commands each device ran (logged device-side by an sshd
ForceCommand wrapper: every exec and sftp session, with the program it started), by kind.
--baseline DIR adds another checkout's enginekiln to every round (before/after a change, in one run).
--timing-cache makes the Ansible playbook keep a trtexec timing cache per device (enginekiln keeps
one per class in its store); by default it has none, like the pipeline the issue measured.
Needs root and /usr/sbin/sshd (the simulator); otherwise prints SKIPPED and exits 0.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
ANSIBLE = REPO / "bench" / "ansible"
GOALS = {"cold": 0.5, "retrain": 0.4}

from _fleet_setup import as_users_run, fleet_project, fmt_s, run_with_fleets, sim_unsupported  # noqa: E402

# ---------------------------------------------------------------------------- the fleet


def logging_fleet_class():
    """A Fleet whose sshd runs every session through a wrapper that logs what was asked for."""
    from tests.fleet.sim import Fleet

    class CommandLoggingFleet(Fleet):
        def _sshd_config(self, d):
            path = super()._sshd_config(d)
            wrapper = d.dir / "log_command.sh"
            wrapper.write_text(
                "#!/bin/sh\n"
                "# one NUL-terminated record per session (the command, or the subsystem), then run it\n"
                f"printf '%s\\0' \"${{SSH_ORIGINAL_COMMAND-}}\" >> {shlex.quote(str(d.dir / 'commands.log'))}\n"
                "case \"${SSH_ORIGINAL_COMMAND-}\" in\n"
                "  internal-sftp) exec /usr/lib/openssh/sftp-server ;;\n"
                "  '') exec \"${SHELL:-/bin/sh}\" -l ;;\n"
                "esac\n"
                "exec \"${SHELL:-/bin/sh}\" -c \"$SSH_ORIGINAL_COMMAND\"\n")
            wrapper.chmod(0o755)
            path.write_text(path.read_text() + f"ForceCommand {wrapper}\n")
            return path

        def commands(self, name: str) -> list[str]:
            log = self.devices[name].dir / "commands.log"
            return log.read_text(errors="replace").split("\0")[:-1] if log.exists() else []

    return CommandLoggingFleet


def command_kind(cmd: str) -> str:
    """A short name for what a session ran: the program after the wrappers both tools add."""
    if cmd == "internal-sftp":
        return "sftp"
    words = cmd.replace(";", " ; ").split()
    # enginekiln: `printf <pid mark> ...; [export X=...;] exec <argv>`; `sh -c <script>` counts as sh
    if "exec" in words:
        words = words[words.index("exec") + 1:]
    # Ansible with pipelining: `/bin/sh -c '/usr/bin/python3 && sleep 0'` (a module on stdin)
    if "python3" in cmd and "sleep 0" in cmd:
        return "ansible module"
    prog = Path(words[0].strip("'\"")).name if words else "?"
    if prog.startswith("python"):
        rest = " ".join(words[1:4])
        for verb in ("agent", "probe", "-c"):
            if verb in rest:
                return f"python {verb}"
        return "python"
    return prog


# ---------------------------------------------------------------------------- weights

def write_weights(path: Path, delta: float) -> None:
    """The tiny model's deterministic weights, one tensor shifted by `delta` (torch in a child)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = ("import torch, sys; sys.path.insert(0, '.'); from examples.tiny_detector import build_model;"
            "sd = build_model().state_dict(); k = next(k for k in sd if k.endswith('weight'));"
            f"sd[k] = sd[k] + {delta!r}; torch.save(sd, {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=300)


# ---------------------------------------------------------------------------- the two pipelines

class Kiln:
    """An enginekiln project over the fleet with an S3 store (fresh per cold run)."""

    def __init__(self, tmp: Path, sim, names: list[str], s3, bucket: str, tag: str, repo: Path = REPO):
        self.sim, self.names, self.repo = sim, names, repo
        self.install = f"/srv/kiln-{tag}"
        self.p = fleet_project(tmp / f"kiln-{tag}", sim, {n: {"groups": ["orins"], "install_dir": self.install}
                                                          for n in names})
        key = tmp / f"kiln-{tag}" / "signing.key"
        self.p.fleet.write_text(self.p.fleet.read_text() + f'\n[store]\nurl = "s3://{bucket}/kiln-{tag}"\n'
                                f'\n[signing]\nkey = "{key}"\n')
        self.env = {**self.p.env, **s3_env(s3)}

    def run(self, weights: Path) -> float:
        self.p.checkpoint().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, self.p.checkpoint())
        return timed([sys.executable, "-m", "doit", "-n", "4", "deploy:orins"], self.env, "doit deploy:orins",
                     cwd=self.repo)

    def serving(self, name: str) -> str | None:
        link = self.sim.srv(name) / self.install.removeprefix("/srv/") / "tiny" / "current"
        return link.resolve().name if link.is_symlink() else None


class Ansible:
    """The hand-written two-stage pipeline: bench/ansible/export_upload.py, then deploy.yml."""

    def __init__(self, tmp: Path, sim, names: list[str], s3, bucket: str, tag: str, timing_cache: bool):
        self.sim, self.names, self.bucket, self.tag = sim, names, bucket, tag
        self.dir = tmp / f"ansible-{tag}"
        self.dir.mkdir(parents=True)
        self.engine_dir = f"/srv/ansible-{tag}"
        self.inventory = self.dir / "inventory.ini"
        common = f"-F {sim.ssh_config_path}"
        self.inventory.write_text("[devices]\n" + "".join(f"{n} ansible_ssh_common_args={shlex.quote(common)}\n"
                                                          for n in names))
        self.timing_cache = timing_cache
        self.env = {**os.environ, **s3_env(s3), "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
                    "ANSIBLE_HOME": str(self.dir / "home"), "ANSIBLE_LOCAL_TEMP": str(self.dir / "tmp"),
                    "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.dir / "cp"), "ANSIBLE_NOCOLOR": "1"}
        self.round = 0
        self.stage1: list[float] = []  # stage 1's wall time (torch export, check, upload) per run

    def run(self, weights: Path) -> float:
        self.round += 1
        vars_file = self.dir / f"vars-{self.round}.json"
        stage1 = [sys.executable, str(ANSIBLE / "export_upload.py"), "--factory", "examples.tiny_detector:build_model",
                  "--checkpoint", str(weights), "--input", "pixel_values=1,3,32,32", "--output", "logits",
                  "--output", "pred_boxes", "--bucket", self.bucket, "--key",
                  f"ansible-{self.tag}/tiny/{self.round}.onnx", "--vars-out", str(vars_file)]
        extra = ["-e", "timing_cache=1"] if self.timing_cache else []
        stage2 = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
                  str(ANSIBLE / "deploy.yml"), "-e", f"@{vars_file}", "-e", f"engine_dir={self.engine_dir}", *extra]
        start = time.perf_counter()
        self.stage1.append(timed(stage1, self.env, "ansible stage 1 (export, upload)"))
        timed(stage2, self.env, "ansible stage 2 (playbook)")
        elapsed = time.perf_counter() - start
        self.close_connections()
        return elapsed

    def close_connections(self) -> None:
        """End the run's ControlPersist masters: the next run (a new CI job) connects afresh."""
        for sock in (self.dir / "cp").glob("*"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=30)

    def serving(self, name: str) -> str | None:
        link = self.sim.srv(name) / self.engine_dir.removeprefix("/srv/") / "model.plan"
        return link.resolve().name if link.is_symlink() else None


def s3_env(s3) -> dict[str, str]:
    from tests.s3server import scrubbed_aws_env
    env = {k: v for k, v in scrubbed_aws_env().items() if v is not None}
    return {**env, "KILN_S3_ENDPOINT_URL": s3.endpoint, "AWS_ENDPOINT_URL_S3": s3.endpoint}


def timed(argv: list[str], env: dict, what: str, timeout: float = 600, cwd: Path = REPO) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return elapsed


# ---------------------------------------------------------------------------- the benchmark

def counted(sim, names: list[str], fn):
    """Run fn(); return (its result, {device: [commands run during it]}, builds during it)."""
    before = {n: len(sim.commands(n)) for n in names}
    builds = sum(len(sim.builds(n)) for n in names)
    result = fn()
    time.sleep(0.2)  # the last session's record may land just after the client returned
    cmds = {n: sim.commands(n)[before[n]:] for n in names}
    return result, cmds, sum(len(sim.builds(n)) for n in names) - builds


def describe(cmds: dict[str, list[str]], builder_hint: str | None = None) -> str:
    parts = []
    for name, lst in cmds.items():
        kinds = collections.Counter(command_kind(c) for c in lst)
        top = ", ".join(f"{k} {v}" for k, v in kinds.most_common(6))
        parts.append(f"{name}: {len(lst)} ({top})")
    return "; ".join(parts)


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: the controller's side of
    a run (doit and its export child; stage 1 and ansible-playbook with their ssh clients)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench(tmp: Path, runs: int, n: int, build_s: str, timing_cache: bool, fleets: list, verbose: bool,
          baseline: Path | None = None) -> list[str]:
    from tests.s3server import MotoS3, patched_env, scrubbed_aws_env
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    Fleet = logging_fleet_class()
    sim = Fleet(tmp / "fleet")
    fleets.append(sim)
    names = [f"orin-{i}" for i in range(n)]
    for name in names:
        sim.add_device(name, "orin-jp5", sim_env={"KILN_SIM_BUILD_SECONDS": build_s})
    sim.start()
    s3 = MotoS3().start()
    tools = ["kiln", "ansible"] + (["kiln@baseline"] if baseline else [])
    phases = ("cold", "retrain")
    times = {f"{t} {p}": [] for p in phases for t in tools}
    cpu = {k: [] for k in times}
    ratios = {f"{t} {p}": [] for p in phases for t in tools if t != "ansible"}
    cmds_seen, builds_seen = {}, collections.defaultdict(list)
    exports = []  # Ansible's stage 1 (export + upload): the part of any such pipeline before a build
    try:
        with patched_env(scrubbed_aws_env()):
            bucket = s3.new_bucket("lean")
        base, weights = tmp / "weights" / "base.pt", tmp / "weights"
        write_weights(base, 0.0)
        for r in range(runs):
            new = weights / f"retrain-{r}.pt"
            write_weights(new, 0.01 * (r + 1))
            pipelines = {"kiln": Kiln(tmp, sim, names, s3, bucket, f"r{r}"),
                         "ansible": Ansible(tmp, sim, names, s3, bucket, f"r{r}", timing_cache)}
            if baseline:
                pipelines["kiln@baseline"] = Kiln(tmp, sim, names, s3, bucket, f"b{r}", repo=baseline)
            order = tools[r % len(tools):] + tools[:r % len(tools)]  # rotated: none always runs first
            ansible = pipelines["ansible"]
            for phase, w in (("cold", base), ("retrain", new)):
                got = {}
                for tool in order:
                    pipeline = pipelines[tool]
                    before = {x: pipeline.serving(x) for x in names}
                    cpu0 = children_cpu()
                    t, cmds, builds = counted(sim, names, lambda: pipeline.run(w))
                    cpu[f"{tool} {phase}"].append(children_cpu() - cpu0)
                    after = {x: pipeline.serving(x) for x in names}
                    if any(after[x] is None or after[x] == before[x] for x in names):
                        raise AssertionError(f"{tool} {phase}: not every device serves a new engine: {before} -> {after}")
                    times[f"{tool} {phase}"].append(t)
                    got[tool] = t
                    cmds_seen[f"{tool} {phase}"] = cmds
                    builds_seen[f"{tool} {phase}"].append(builds)
                    if verbose:
                        print(f"  round {r + 1} {tool} {phase}: {t:.2f} s, builds {builds}; commands {describe(cmds)}",
                              flush=True)
                for tool in got:
                    if tool != "ansible":
                        ratios[f"{tool} {phase}"].append(got[tool] / got["ansible"])
            exports.extend(ansible.stage1)
            print(f"round {r + 1}/{runs}: " + "; ".join(
                f"{p} " + " / ".join(f"{t} {times[f'{t} {p}'][-1]:.2f} s" for t in tools) for p in phases), flush=True)
    finally:
        s3.stop()
    cache = "with" if timing_cache else "without"
    lines = [f"{n} simulated Orins, {build_s} s builds, tiny model, moto S3; Ansible {cache} a timing cache; {runs} rounds"
             + (f"; kiln@baseline = the checkout {baseline}" if baseline else "")]
    for key, samples in times.items():
        lines.append(f"  {key:22s} {fmt_s(samples)}, controller CPU {fmt_s(cpu[key])}, builds on the devices "
                     f"{builds_seen[key]}")
    for key, cmds in cmds_seen.items():
        if not key.startswith("kiln@"):
            lines.append(f"  remote commands per device, last {key}: {describe(cmds)}")
    # a floor for any pipeline that exports, then builds on a device: the export and upload (as
    # Ansible's stage 1 measured them) plus one build (halved by enginekiln's timing cache on a
    # retrain), with no SSH, verification or deploy at all
    build = float(build_s)
    floors = {"cold": statistics.median(exports) + build, "retrain": statistics.median(exports) + build / 2}
    lines.append(f"  Ansible stage 1 (torch export, onnx.checker, upload) {fmt_s(exports)}")
    for phase, floor in floors.items():
        rs = [floor / t for t in times[f"ansible {phase}"]]
        lines.append(f"  floor {phase}: stage 1 + {'a' if phase == 'cold' else 'a timing-cached'} build = {floor:.2f} s "
                     f"= {statistics.median(rs):.2f}x Ansible [{min(rs):.2f}-{max(rs):.2f}] (goal {GOALS[phase]}x)")
    for key, rs in ratios.items():
        tool, phase = key.split()
        med = statistics.median(rs)
        goal = f" (goal <= {GOALS[phase]}x -> {'OK' if med <= GOALS[phase] else 'MISSED'})" if tool == "kiln" else ""
        name = "enginekiln" if tool == "kiln" else tool
        lines.append(f"summary: lean {phase} ({n} Orins, {build_s} s builds): {name} {fmt_s(times[key])} "
                     f"vs Ansible {fmt_s(times[f'ansible {phase}'])} = {med:.2f}x [{min(rs):.2f}-{max(rs):.2f}]{goal}; "
                     f"controller CPU {statistics.median(cpu[key]):.1f} s vs {statistics.median(cpu[f'ansible {phase}']):.1f} s; "
                     f"builds {statistics.median(builds_seen[key]):.0f} vs {statistics.median(builds_seen[f'ansible {phase}']):.0f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("KILN_BENCH_RUNS", 3)))
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--build-seconds", default="2", help="simulated engine build time (default 2)")
    ap.add_argument("--timing-cache", action="store_true", help="the Ansible playbook keeps a timing cache per device")
    ap.add_argument("--baseline", type=Path, help="another checkout (e.g. `git archive main`) timed the same way, "
                    "interleaved: before/after a change in one run")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every timed run with its commands")
    args = ap.parse_args(argv)
    as_users_run()
    print(f"== lean cold/retrain benchmark vs an Ansible pipeline: {args.runs} rounds, {os.cpu_count()} CPUs ==")
    reason = sim_unsupported()
    if reason:
        print(f"SKIPPED: simulated fleet unavailable: {reason}")
        return 0
    if not (Path(sys.executable).parent / "ansible-playbook").exists():
        print("SKIPPED: ansible-playbook is not installed in this venv (pip install ansible-core)")
        return 0

    def body(tmp: Path, fleets: list) -> None:
        print("\n".join(bench(tmp, args.runs, args.devices, args.build_seconds, args.timing_cache, fleets,
                              args.verbose, args.baseline)), flush=True)
    return run_with_fleets("lean", body)


if __name__ == "__main__":
    sys.exit(main())
