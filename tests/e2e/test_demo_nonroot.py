"""`make demo` for a user who is not root (issue #13).

The demo's operator (`hack/demo.sh --operator`, the very command `make demo` starts)
listens on no port at all, and finishes the demo JobWatch when it runs as an
unprivileged user; a port that user may not take stops the operator at once with
one line. Run as root (as CI does), the tests drop to a user of their own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import OperatorFactory
from harness import REPO, JobServer, Namespace, Reply, free_port, wait_for

pytestmark = pytest.mark.e2e

DEMO_USER = "jobwatch-demo"
CAP_NET_BIND_SERVICE = 1 << 10


@dataclass(frozen=True)
class User:
    """Runs commands as a user who is not root, in a folder of its own."""

    prefix: tuple[str, ...]  # command prefix that switches to the user; empty if we are one
    uid: int
    gid: int
    home: Path

    def give(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.prefix:
            os.chown(path, self.uid, self.gid)


def _demo_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(DEMO_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir=/nonexistent",
                "--shell=/usr/sbin/nologin",
                DEMO_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(DEMO_USER)


def _switch(account: pwd.struct_passwd, *caps: str) -> tuple[str, ...]:
    ids = [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    keep = ",".join(["-all", *(f"+{cap}" for cap in caps)])
    return ("setpriv", *ids, f"--inh-caps={keep}", f"--ambient-caps={keep}", "--no-new-privs")


@pytest.fixture
def user() -> Iterator[User]:
    home = Path(tempfile.mkdtemp(prefix="jobwatch-demo-"))
    try:
        if os.geteuid() != 0:
            yield User((), os.getuid(), os.getgid(), home)
            return
        account = _demo_account()
        prefix = _switch(account)
        # The venv's interpreter may live where only root can read (pyenv under /root,
        # as on CI). Then the user gets CAP_DAC_READ_SEARCH, to read the checkout and
        # run it: it still writes only its own files, and has no CAP_NET_BIND_SERVICE.
        probe = subprocess.run(
            [*prefix, "bash", "-c", "cd \"$0\" && .venv/bin/python -c ''", str(REPO)],
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            prefix = _switch(account, "dac_read_search")
        made = User(prefix, account.pw_uid, account.pw_gid, home)
        made.give(home, 0o700)
        yield made
    finally:
        shutil.rmtree(home, ignore_errors=True)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports (IPv4 and IPv6) that process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def credentials(pid: int) -> tuple[int, int]:
    """(real uid, effective capabilities) of process `pid`."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(status["Uid"].split()[0]), int(status["CapEff"], 16)


@pytest.fixture
def job_api() -> Iterator[str]:
    """demo/jobservice.py, as `make demo` runs it (shorter phases); yields its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "demo/jobservice.py", f"--port={port}", "--queued=1", "--processing=2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/api/jobs/probe/status", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(answers, 30, "the demo job API")
        yield base
    finally:
        server.terminate()
        server.wait(10)


def test_demo_operator_runs_unprivileged_listens_on_no_port_and_finishes_the_demo_watch(
    ns: Namespace, operator_kubeconfig: Path, user: User, job_api: str, test_logs: Path
) -> None:
    kubeconfig = user.home / "operator.kubeconfig"
    shutil.copyfile(operator_kubeconfig, kubeconfig)
    user.give(kubeconfig, 0o600)
    env = {
        **os.environ,
        "HOME": str(user.home),
        # The demo watches the whole cluster; here only this test's namespace.
        "JOBWATCH_NAMESPACES": ns.name,
    }
    with (test_logs / "operator.log").open("wb") as log:
        operator = subprocess.Popen(
            [*user.prefix, str(REPO / "hack" / "demo.sh"), "--operator", str(kubeconfig)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        sample = (REPO / "manifests" / "samples" / "job-api.yaml").read_text()
        applied = ns.cluster.kubectl(
            "apply",
            "-n",
            ns.name,
            "-f",
            "-",
            stdin=sample.replace("http://reports.default.svc", job_api),
        )
        assert applied.returncode == 0, applied.stderr

        def ended() -> bool:
            exited = operator.poll() is not None
            return exited or ns.status("report-42").get("phase") == "Succeeded"

        wait_for(ended, 60, "report-42 Succeeded (or the operator's exit)", interval=0.1)
        assert operator.poll() is None, (test_logs / "operator.log").read_text()[-2000:]
        assert ns.status("report-42")["result"]["link"].endswith("/42.pdf")
        # By now the process is the operator itself (setpriv and demo.sh exec it).
        uid, caps = credentials(operator.pid)
        assert uid == user.uid != 0
        assert not caps & CAP_NET_BIND_SERVICE
        assert listening_ports(operator.pid) == set()
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
            raise


def test_operator_listens_only_on_the_ports_it_is_given(
    ns: Namespace, jobs: JobServer, start_operator: OperatorFactory
) -> None:
    # The counterpart of the test above: the same /proc reading finds both endpoints.
    metrics = free_port()
    op = start_operator(JOBWATCH_METRICS_PORT=str(metrics))
    assert op.process is not None
    url = jobs.script("/done", [Reply(200, {"status": "COMPLETED"})])
    ns.create("done", {"url": url, "successWhen": 'response.body.status == "COMPLETED"'})
    ns.wait_phase("done", "Succeeded")
    assert listening_ports(op.process.pid) == {op.health_port, metrics}
    with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        assert b"jobwatch_polls_total" in r.read()


def test_a_port_the_user_may_not_take_stops_the_operator_with_one_line(user: User) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 80:
        pytest.skip(f"any user may listen on port 80 here (ip_unprivileged_port_start={start})")
    ran = subprocess.run(
        [*user.prefix, str(REPO / ".venv" / "bin" / "python"), "-m", "jobwatch"],
        env={**os.environ, "HOME": str(user.home), "JOBWATCH_HEALTH_PORT": "80"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1
    assert ran.stderr == (
        "jobwatch: JOBWATCH_HEALTH_PORT=80: cannot listen on 0.0.0.0:80: permission denied"
        " (set another port, or 0 for no endpoint)\n"
    )
