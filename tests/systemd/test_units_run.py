"""The provisioned units, started for real by a systemd service manager on this machine.

Provisioning writes a root (generic-x86_64, the demo model fetched over file:// and verified);
its ``ppchat-agent.service``, ``ppchat-train.path``/``.service`` and the coordinator's unit then run
under ``systemd --user`` as root (tests/systemd/manager.py), which applies every sandboxing setting
as the system manager does: seccomp filters, MemoryDenyWriteExecute=, the mount namespace, User=.

What a test changes in a unit, and why (a drop-in and path rewrites, nothing else):
- the install paths: ``/opt/ppchat/.venv/bin/agent`` -> this checkout's venv python ``-m agent``,
  ``/etc/ppchat/agent.toml`` -> the provisioned config with its paths moved under the test's base
  directory, ``/run/ppchat`` and ``/var/lib/ppchat`` -> the manager's runtime and state directories;
- ``User=nobody`` (this machine has no ppchat user and the test does not add one);
- ``ProtectHome=tmpfs`` + ``BindReadOnlyPaths=`` of the Python installation when it lives under
  /root or /home (pyenv): ``ProtectHome=yes`` would hide the interpreter itself;
- ``PYTHONPATH`` = this checkout (ppchat is not pip-installed in the development venv);
- a short ``WatchdogSec=`` so that the test sees the daemon's pings keep it alive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import MosquittoBroker
from tests.scripts.provision_support import REPO, FakeRunner, make_os_root, provision, sha256
from tests.systemd.manager import ManagerError, UserManager, unavailable_reason

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
]

AGENT = "ppchat-agent.service"
TRAIN = "ppchat-train.service"


def _dropin(base: Path, log: str, *extra: str) -> str:
    lines = [
        "[Service]",
        "User=nobody",
        "Group=nogroup",
        f"Environment=PYTHONPATH={REPO}",
        f"StandardOutput=append:{base / log}",
        f"StandardError=append:{base / log}",
    ]
    python_home = Path(sys.base_prefix).resolve()
    if python_home.is_relative_to("/root") or python_home.is_relative_to("/home"):
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={python_home}"]
    if _under_private_tmp(REPO):  # a checkout in /tmp (CI's clone): PrivateTmp= would hide it
        lines += [f"BindReadOnlyPaths={REPO.resolve()}"]
    return "\n".join([*lines, *extra]) + "\n"


def _wait(predicate: Any, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    # Not under /tmp, /var/tmp (PrivateTmp=), /root, /home (ProtectHome=) or /run (a user manager's
    # units get their own /run).
    path = Path(tempfile.mkdtemp(prefix="ppchat-systemd-test-", dir="/var/lib"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _under_private_tmp(path: Path) -> bool:
    real = path.resolve()
    return real.is_relative_to("/tmp") or real.is_relative_to("/var/tmp")


def _unreachable_by_others(path: Path) -> Path | None:
    """The first directory above ``path`` that the units' user (nobody) cannot enter, if any."""
    for parent in [*reversed(path.resolve().parents), path.resolve()]:
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


@pytest.fixture(scope="module")
def manager(base: Path) -> Iterator[UserManager]:
    closed = _unreachable_by_others(REPO)
    if closed is not None:
        pytest.skip(f"the checkout is not reachable by the units' user: {closed} has no o+x")
    running = UserManager(base / "manager")
    try:
        running.start()
    except ManagerError as exc:  # the machine, not the units: e.g. a container without cgroup access
        running.remove_cgroups()
        pytest.skip(f"no systemd service manager can run here: {exc}")
    try:
        yield running
    finally:
        running.stop()
        running.remove_cgroups()


@pytest.fixture(scope="module")
def provisioned(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Any, base: Path, manager: UserManager
) -> Path:
    """A provisioned root; its config moved under ``base``, its units installed into the manager."""
    root = make_os_root(tmp_path_factory.mktemp("provisioned") / "root")
    model = demo_model.q8_0
    args = ["--root", str(root), "--board", "generic-x86_64"]
    args += ["--model-url", model.as_uri(), "--model-sha256", sha256(model)]
    result = provision(args, FakeRunner(root))
    assert result.code == 0, result.out + result.err

    state, runtime = manager.state / "ppchat", manager.runtime / "ppchat"
    models = base / "models"
    models.mkdir()
    installed = root / "opt/ppchat/models" / model.name
    shutil.copy(installed, models / model.name)  # the file provisioning fetched and verified
    (models / model.name).chmod(0o644)
    config = (root / "etc/ppchat/agent.toml").read_text()
    config = config.replace("/opt/ppchat/models/", f"{models}/")
    config = config.replace('"/var/lib/ppchat"', f'"{state}"').replace('"/run/ppchat"', f'"{runtime}"')
    config = config.replace("n_threads = ", "# n_threads = ")  # two cores here
    (base / "agent.toml").write_text(config)
    (base / "agent.toml").chmod(0o644)

    py = sys.executable
    for name in ("ppchat-agent.service", "ppchat-train.service", "ppchat-train.path"):
        text = (root / "etc/systemd/system" / name).read_text()
        text = text.replace("/opt/ppchat/.venv/bin/agent train", f"{py} {base / 'fake-train.py'} train")
        text = text.replace("/opt/ppchat/.venv/bin/agent", f"{py} -m agent")
        text = text.replace("/opt/ppchat/.venv/bin/python", py)
        text = text.replace("/etc/ppchat/agent.toml", str(base / "agent.toml"))
        text = text.replace("/run/ppchat/", f"{runtime}/").replace(
            "ReadWritePaths=/run/ppchat", f"ReadWritePaths={runtime}"
        )
        manager.install(name, text)
    manager.install(f"{AGENT}.d/test.conf", _dropin(base, "agent.log", "WatchdogSec=3s"))
    manager.install(f"{TRAIN}.d/test.conf", _dropin(base, "train.log"))
    return root


def test_the_provisioned_agent_unit_starts_serves_and_stops(
    manager: UserManager, provisioned: Path, base: Path
) -> None:
    started = time.monotonic()
    manager.systemctl("start", AGENT)  # returns when the daemon has sent READY=1
    ready_s = time.monotonic() - started
    props = manager.show(AGENT, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert props["ActiveState"] == "active", (base / "agent.log").read_text()
    assert props["StatusText"].startswith("ready"), props
    pid = props["MainPID"]
    time.sleep(7.5)  # more than twice WatchdogSec=3s: only the daemon's WATCHDOG=1 keeps it alive
    later = manager.show(AGENT, "ActiveState", "MainPID", "NRestarts")
    assert later == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, (
        base / "agent.log"
    ).read_text()

    chat = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(base / "agent.toml"), "chat", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr

    keys = manager.state / "ppchat" / "keys"
    key = (keys / "identity.key").stat()
    assert key.st_mode & 0o777 == 0o600 and key.st_uid == 65534  # made by the service, as its user
    assert "created: first boot" in (base / "agent.log").read_text()

    manager.systemctl("stop", AGENT)
    done = manager.show(AGENT, "ActiveState", "Result", "ExecMainStatus")
    assert done == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    print(f"\nagent under the hardened unit: READY after {ready_s:.1f} s, watchdog held, chat answered")


PROBE = """
import json, mmap, os, socket, sys
out = {}
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx"] = "allowed"
except OSError as e:
    out["wx"] = e.errno
for name, attempt in (
    ("etc", lambda: open("/etc/ppchat-probe", "w")),
    ("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
    ("nice", lambda: os.setpriority(os.PRIO_PROCESS, 0, 19)),
):
    try:
        attempt()
        out[name] = "allowed"
    except OSError as e:
        out[name] = e.errno
from llama_cpp import Llama  # installs its ctypes log callback at import
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
out["llama"] = "ok" if isinstance(llm("Hello", max_tokens=4)["choices"][0]["text"], str) else "no text"
import torch  # what the trainer child does: oneDNN kernels, autograd
try:
    layer = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    layer(torch.randn(8, 64)).pow(2).mean().backward()
    out["torch"] = "ok"
except RuntimeError as e:
    out["torch"] = str(e)[:80]
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("mdwe", ["as shipped", "yes"])
def test_the_agents_sandbox(manager: UserManager, provisioned: Path, base: Path, mdwe: str) -> None:
    """The agent unit's [Service] sandbox running a probe of what the daemon and its trainer child do.

    As shipped: /etc is read-only, raw sockets are refused, the trainer child may lower its priority
    and torch trains. With MemoryDenyWriteExecute=yes (the setting the unit leaves off): llama.cpp
    with its ctypes callback still works, but torch does not: why the unit leaves it off while the
    trainer is the daemon's child (docs/operations.md).
    """
    probe = base / "probe.py"
    probe.write_text(PROBE)
    probe.chmod(0o644)
    model = next((base / "models").glob("*.gguf"))
    text = (manager.units / AGENT).read_text()
    service = text[text.index("[Service]") : text.index("[Install]")]
    skip = ("Type=", "ExecStart", "Restart", "Watchdog", "NotifyAccess", "Timeout")
    kept = [line for line in service.splitlines() if not line.startswith(skip)]
    name = f"probe-{'shipped' if mdwe == 'as shipped' else 'mdwe'}.service"
    log = f"{name}.log"
    manager.install(
        name, "\n".join([*kept, "Type=oneshot", f"ExecStart={sys.executable} {probe} {model}"]) + "\n"
    )
    extra = () if mdwe == "as shipped" else ("MemoryDenyWriteExecute=yes",)
    manager.install(f"{name}.d/test.conf", _dropin(base, log, *extra))
    manager.systemctl("start", name, timeout_s=300)
    result = json.loads((base / log).read_text().strip().splitlines()[-1])
    assert (result["etc"], result["packet"], result["llama"]) == (30, 97, "ok")  # EROFS, EAFNOSUPPORT
    if mdwe == "as shipped":
        assert result["nice"] == "allowed" and result["torch"] == "ok", result
    else:
        assert result["wx"] == 1, result  # EPERM
        assert result["torch"] != "ok", "torch trains under MemoryDenyWriteExecute=yes now: turn it on"
    print(f"\nagent sandbox probe ({mdwe}): {result}")


def test_a_training_request_starts_the_low_priority_unit(
    manager: UserManager, provisioned: Path, base: Path
) -> None:
    (base / "fake-train.py").write_text(
        "import json, os, sys\n"
        "state = sys.argv[sys.argv.index('--config') + 1]\n"
        "report = {\n"
        "    'argv': sys.argv[1:],\n"
        "    'nice': os.nice(0),\n"
        "    'sched_idle': os.sched_getscheduler(0) == os.SCHED_IDLE,\n"
        "    'oom_score_adj': int(open('/proc/self/oom_score_adj').read()),\n"
        "}\n"
        "print(json.dumps(report), flush=True)\n"
    )
    (base / "fake-train.py").chmod(0o644)
    manager.systemctl("start", AGENT)
    try:
        request = manager.runtime / "ppchat" / "train-request"
        request.write_text("PPCHAT_TRAIN_ARGS=--adapter fleet --max-steps 3\n")
        log = base / "train.log"
        _wait(lambda: log.exists() and log.read_text().strip(), what="the training unit")
        _wait(lambda: not request.exists(), what="the request to be consumed")
        report = json.loads(log.read_text().strip().splitlines()[-1])
        assert report["argv"] == [
            "train",
            "--config",
            str(base / "agent.toml"),
            "--adapter",
            "fleet",
            "--max-steps",
            "3",
        ]
        assert report["nice"] == 19 and report["sched_idle"] and report["oom_score_adj"] == 800
        _wait(lambda: manager.show(TRAIN, "ActiveState")["ActiveState"] == "inactive", what="the run to end")
        props = manager.show(TRAIN, "Result", "MemoryMax", "MemoryHigh")
        assert props["Result"] == "success"
        assert props["MemoryMax"] not in ("", "infinity") and props["MemoryHigh"] not in ("", "infinity")
    finally:
        manager.systemctl("stop", AGENT)


def test_the_coordinator_unit_runs(
    manager: UserManager, base: Path, mosquitto_broker: MosquittoBroker
) -> None:
    config = base / "coordinator.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{manager.state / "ppchat-coordinator"}"\n'
        f'[broker]\nurl = "mqtt://{mosquitto_broker.host}:{mosquitto_broker.port}"\n'
        f'client_id = "coord-unit-test"\ntopic_root = "unittest{os.getpid()}"\n'
    )
    config.chmod(0o644)
    cli = f'{sys.executable} -c "import sys; from coordinator.cli import main; sys.exit(main())"'
    text = (REPO / "systemd/ppchat-coordinator.service").read_text()
    text = text.replace("/opt/ppchat/.venv/bin/coordinator", cli).replace(
        "/etc/ppchat/coordinator.toml", str(config)
    )
    manager.install("ppchat-coordinator.service", text)
    manager.install("ppchat-coordinator.service.d/test.conf", _dropin(base, "coordinator.log"))
    manager.systemctl("start", "ppchat-coordinator.service")
    try:
        time.sleep(4)
        props = manager.show("ppchat-coordinator.service", "ActiveState", "NRestarts")
        assert props == {"ActiveState": "active", "NRestarts": "0"}, (base / "coordinator.log").read_text()
        assert (manager.state / "ppchat-coordinator" / "keys" / "identity.key").exists()
    finally:
        manager.systemctl("stop", "ppchat-coordinator.service")
    done = manager.show("ppchat-coordinator.service", "Result", "ExecMainStatus")
    assert done == {"Result": "success", "ExecMainStatus": "0"}, (base / "coordinator.log").read_text()
