"""The multi-node test infrastructure itself (tests/multinode.py, tests/infra/): a real 2-node SLURM
cluster (srun, sbatch, fake GPUs through GRES, submitit, the sacct stand-in, teardown that kills job
processes) and two real sshd hosts on 127.0.0.2 and 127.0.0.3."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from multinode import SLURM_TOOLS, require, start_slurm, stop_slurm


def wait_job(cluster, jid: str, timeout: float = 60) -> dict[str, str]:
    """Poll until job `jid` has left squeue; return its `scontrol show job` fields."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if not cluster.run("squeue", "-h", "-j", jid).strip():
            return dict(re.findall(r"(\S+?)=(\S*)", cluster.run("scontrol", "show", "job", "-o", jid)))
        time.sleep(0.2)
    raise TimeoutError(f"job {jid} still queued after {timeout}s:\n{cluster.run('squeue')}\n{cluster.logs()}")


def test_cluster_shape(slurm_cluster):
    assert slurm_cluster.partition == "debug" and slurm_cluster.nodes == ["node1", "node2"]
    assert slurm_cluster.env["SLURM_CONF"] == str(slurm_cluster.dir / "slurm.conf")
    assert slurm_cluster.env["PATH"].split(os.pathsep)[0].endswith("tests/infra/bin")
    rows = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t %P %c %G").split("\n")
    assert sorted(r for r in rows if r) == ["node1 idle debug* 2 gpu:2", "node2 idle debug* 2 gpu:2"]


def test_srun_two_nodes(slurm_cluster):
    out = slurm_cluster.run("srun", "-N2", "-p", slurm_cluster.partition,
                            "bash", "-c", "echo $SLURM_NODEID $SLURM_PROCID $SLURMD_NODENAME")
    assert sorted(x for x in out.split("\n") if x) == ["0 0 node1", "1 1 node2"]


def test_sbatch_two_nodes_and_sacct_stand_in(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nscontrol show hostnames \"$SLURM_JOB_NODELIST\"\n"
                      "srun bash -c 'echo step $SLURM_NODEID'\n")
    out = tmp_path / "out"
    jid = slurm_cluster.run("sbatch", "--parsable", "-N2", "-o", str(out), "-D", str(tmp_path), str(script)).strip()
    info = wait_job(slurm_cluster, jid)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    lines = out.read_text().split()
    assert lines[:2] == ["node1", "node2"] and sorted(out.read_text().split("\n")[2:4]) == ["step 0", "step 1"]
    # `sacct` on the clients' PATH is the stand-in (no accounting daemon): it answers from scontrol
    assert slurm_cluster.run("sacct", "-o", "JobID,State", "-P", "-n", "-j", jid).strip() == f"{jid}|COMPLETED"


def test_gpu_gres_without_gpus(slurm_cluster, tmp_path):
    """Jobs may ask for GPUs (fake GRES: 2 per node) and get scheduled, though no GPU exists."""
    out = tmp_path / "out"
    jid = slurm_cluster.run("sbatch", "--parsable", "--gpus-per-node=1", "-N1", "-o", str(out),
                            "--wrap", "echo gpus=$SLURM_GPUS_ON_NODE cvd=$CUDA_VISIBLE_DEVICES").strip()
    info = wait_job(slurm_cluster, jid)
    assert info["JobState"] == "COMPLETED", info
    # the fake "device files" are char devices (mknod) -> CUDA_VISIBLE_DEVICES=0; where mknod is not
    # allowed they are plain files, and Slurm leaves CUDA_VISIBLE_DEVICES empty. No GPU either way.
    cvd = "0" if (slurm_cluster.dir / "fakegpu0").is_char_device() else ""
    assert out.read_text().split() == ["gpus=1", f"cvd={cvd}"]
    # more GPUs than a node has: refused at submission
    r = subprocess.run(["sbatch", "--gpus-per-node=3", "-N1", "--wrap", "true"], env=slurm_cluster.environ(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "configuration is not available" in r.stderr


def test_submitit_two_nodes(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    slurm_cluster.apply(monkeypatch)  # submitit runs sbatch/sacct in-process: SLURM_CONF + PATH

    def where():
        env = submitit.JobEnvironment()
        return env.global_rank, env.num_nodes, os.environ["SLURMD_NODENAME"]

    ex = submitit.AutoExecutor(folder=tmp_path)
    assert ex.cluster == "slurm"
    ex.update_parameters(nodes=2, tasks_per_node=1, slurm_partition=slurm_cluster.partition, timeout_min=5)
    job = ex.submit(where)
    assert sorted(job.results()) == [(0, 2, "node1"), (1, 2, "node2")]
    # job.state comes from `sacct` (the stand-in); without it submitit reports UNKNOWN forever.
    # results() returns once the result files exist, so the state may still lag a poll behind.
    seen, t = [], time.monotonic()
    while (state := job.get_info(mode="force").get("State", "UNKNOWN")) != "COMPLETED":
        seen.append(state)
        assert time.monotonic() - t < 30 and state in ("PENDING", "RUNNING", "COMPLETING"), seen
        time.sleep(0.2)
    assert job.state == "COMPLETED"


def test_ssh_two_hosts(ssh_hosts):
    assert [h["host"] for h in ssh_hosts.hosts] == ["127.0.0.2", "127.0.0.3"]
    seen = []
    for i, h in enumerate(ssh_hosts.hosts):
        assert h["user"] == "root" and h["key"] == str(ssh_hosts.key) and isinstance(h["port"], int)
        cmd = ["ssh", "-i", h["key"], "-p", str(h["port"]), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", f"UserKnownHostsFile={ssh_hosts.known_hosts}", f"root@{h['host']}",
               'echo ok; echo $SSH_CONNECTION; echo $MN_SSH_HOST']
        ok, conn, name = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[:3]
        assert ok == "ok" and name == h["name"]
        assert conn.split()[2:] == [h["host"], str(h["port"])]  # server address:port of this session
        seen.append(conn.split()[2])
        # the ssh_config aliases reach the same host
        out = subprocess.run(["ssh", "-F", str(ssh_hosts.ssh_config), h["name"], "echo $MN_SSH_HOST"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        assert out == h["name"]
        assert subprocess.run(ssh_hosts.ssh_args(i) + ["true"], timeout=30).returncode == 0
    assert seen == ["127.0.0.2", "127.0.0.3"]
    pids = ssh_hosts.pids()
    assert len(set(pids)) == 2
    for pid, h in zip(pids, ssh_hosts.hosts):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "sshd" in cmdline and f"sshd_{h['name']}.conf" in cmdline
        assert f"ListenAddress {h['host']}\n" in (ssh_hosts.dir / f"sshd_{h['name']}.conf").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    st = Path(f"/proc/{pid}/stat")
    return not (st.exists() and st.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_stop_kills_daemons_and_job_processes(tmp_path):
    """A private cluster: stopping it ends its daemons and its jobs' processes, even escaped ones."""
    require(*SLURM_TOOLS)
    cluster = start_slurm()
    try:
        pidfile = tmp_path / "pids"
        # a 2-node step, plus a process that double-forks out of the job's process tree
        cluster.run("sbatch", "-N2", "-o", "/dev/null", "--wrap",
                    f"srun bash -c 'echo $$ >> {pidfile}; exec sleep 300' & "
                    f"( setsid sleep 301 >/dev/null 2>&1 & echo $! >> {pidfile} ); wait")
        t = time.monotonic()
        while not (pidfile.exists() and len(pidfile.read_text().split()) == 3):
            assert time.monotonic() - t < 30, cluster.logs()
            time.sleep(0.1)
        jobs = [int(p) for p in pidfile.read_text().split()]
        daemons = [int(f.read_text()) for f in (cluster.dir / "run").glob("*.pid")]
        assert len(daemons) == 4 and all(map(_alive, jobs + daemons))
    finally:
        stop_slurm(cluster)
    assert not any(map(_alive, jobs + daemons))
    assert not cluster.dir.exists()


def test_require_skips_or_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-ftl"):
        require("no-such-tool-ftl")
    for v in ("true", "1"):
        monkeypatch.setenv("CI", v)
        with pytest.raises(pytest.fail.Exception, match="no-such-tool-ftl"):
            require("no-such-tool-ftl")
