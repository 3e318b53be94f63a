"""A real systemd service manager for tests, on a machine that was not booted with systemd.

``systemd --user`` run as root is a full service manager: it applies every sandboxing setting of a
unit (mount namespaces, seccomp filters, MemoryDenyWriteExecute=, User=, capabilities) exactly as
the system manager does, with the same code. It refuses to start unless ``/run/systemd/system``
exists ("booted with systemd"), so it runs in a private mount namespace (``unshare -m``) where a
tmpfs over ``/run/systemd`` carries that marker; the host's ``/run`` is untouched.

    with UserManager(base) as manager:    # base: outside /tmp, /var/tmp (PrivateTmp=), /home, /root
                                          # (ProtectHome=) and /run (a user manager's units get a
                                          # private /run holding only $XDG_RUNTIME_DIR)
        manager.install(unit_text, "ppchat-agent.service")
        manager.systemctl("start", "ppchat-agent.service")

Units are searched only in ``<base>/units`` (``$SYSTEMD_UNIT_PATH``), so nothing of the host's user
units (D-Bus, gpg-agent) starts. ``StateDirectory=`` and ``RuntimeDirectory=`` resolve to
``<base>/state/NAME`` and ``<base>/run/NAME``.

Needs root, ``unshare`` and ``/lib/systemd/systemd``; :func:`unavailable_reason` says why not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SYSTEMD = next((p for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd") if Path(p).exists()), None)
UNSHARE = shutil.which("unshare")
SYSTEMCTL = shutil.which("systemctl")

# The manager must live in a cgroup of its own: a user manager moves every process of the cgroup it
# starts in under its "init.scope" (and sets a tasks limit there), so started in a root cgroup it would
# take the host's processes with it. It joins a new child cgroup in every hierarchy first (cpuset,
# which needs CPUs and memory nodes assigned, is left alone: systemd does not use it here).
_LAUNCH = """
set -e
if [ -f /sys/fs/cgroup/cgroup.procs ]; then dirs=/sys/fs/cgroup
else dirs=$(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/mounts); fi
for h in $dirs; do
  case "$h" in *cpuset*) continue ;; esac
  mkdir -p "$h/$1"
  echo $$ > "$h/$1/cgroup.procs"
done
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/systemd/system /run/systemd/inaccessible
# What the system manager makes at boot: some sandboxing settings (ProtectKernelTunables=,
# ProtectKernelLogs=) mount these even in a user manager, whose own copies live elsewhere.
cd /run/systemd/inaccessible
mkdir -m 0 dir && : > reg && chmod 0 reg && mknod -m 0 chr c 0 0 && mknod -m 0 blk b 0 0 && mkfifo -m 0 fifo
cd /
exec "$0" --user --log-target=console --log-level=info
"""

# The units that services' default dependencies name (the host's user units are not searched), and
# what ``systemctl --user exit`` starts: exit.target -> systemd-exit.service -> the manager exits.
_TARGETS = ("default.target", "basic.target", "paths.target", "timers.target")
_EXIT_UNITS = {
    "shutdown.target": "[Unit]\nDefaultDependencies=no\nRefuseManualStart=yes\n",
    "exit.target": (
        "[Unit]\nDefaultDependencies=no\nRequires=systemd-exit.service\nAfter=systemd-exit.service\nAllowIsolate=yes\n"
    ),
    "systemd-exit.service": (
        "[Unit]\nDefaultDependencies=no\nRequires=shutdown.target\nAfter=shutdown.target\n"
        "SuccessAction=exit-force\n[Service]\nSlice=-.slice\n"
    ),
}


def unavailable_reason() -> str | None:
    """None when a user manager can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (a private mount namespace and a manager that may switch users)"
    if SYSTEMD is None or UNSHARE is None or SYSTEMCTL is None:
        return "needs systemd, systemctl and unshare installed"
    if not Path("/run/systemd").is_dir():
        return "needs /run/systemd (the mount point for the 'booted with systemd' marker)"
    return None


class ManagerError(RuntimeError):
    pass


class UserManager:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.units = self.base / "units"
        self.runtime = self.base / "run"
        self.state = self.base / "state"
        # StateDirectory= is $XDG_CONFIG_HOME/NAME in systemd 252's user mode, $XDG_STATE_HOME/NAME
        # later: both point here. (The units' own search path is $SYSTEMD_UNIT_PATH.)
        self.config = self.state
        self.log_path = self.base / "manager.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.cgroup = f"ppchat-test-{uuid.uuid4().hex[:12]}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "DBUS_", "SYSTEMD_"))}
        env.update(
            XDG_RUNTIME_DIR=str(self.runtime),
            XDG_STATE_HOME=str(self.state),
            XDG_CONFIG_HOME=str(self.config),
            SYSTEMD_UNIT_PATH=str(self.units),
            SYSTEMD_PAGER="",
            SYSTEMD_COLORS="0",
        )
        return env

    def start(self, *, timeout_s: float = 30.0) -> None:
        assert SYSTEMD is not None and UNSHARE is not None
        for d in (self.units, self.state):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        for target in _TARGETS:
            (self.units / target).write_text(f"[Unit]\nDescription=test manager's {target}\n")
        for name, text in _EXIT_UNITS.items():
            (self.units / name).write_text(text)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [UNSHARE, "-m", "sh", "-c", _LAUNCH, SYSTEMD, self.cgroup],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise ManagerError(f"systemd --user exited with {self._proc.returncode}:\n{self.log()}")
            if (self.runtime / "systemd" / "private").exists():
                # (``is-system-running`` answers "offline" without asking: the host was not booted
                # with systemd; ``show`` asks the manager itself.)
                probe = self.systemctl("show", "--property=SystemState", "--value", check=False)
                if probe.stdout.strip() in {"running", "degraded"}:
                    # Services run as another user (User=): they must reach the notify socket, as
                    # they reach the system manager's /run/systemd/notify (0777).
                    self.runtime.chmod(0o755)
                    (self.runtime / "systemd").chmod(0o755)
                    (self.runtime / "systemd" / "notify").chmod(0o777)
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise ManagerError(f"systemd --user did not come up in {timeout_s} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def systemctl(
        self, *args: str, check: bool = True, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        assert SYSTEMCTL is not None
        result = subprocess.run(
            [SYSTEMCTL, "--user", "--no-pager", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise ManagerError(
                f"systemctl --user {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}\n"
                f"--- manager log ---\n{self.log()[-4000:]}"
            )
        return result

    def install(self, name: str, text: str) -> Path:
        """Write a unit (or ``NAME.d/FILE.conf`` drop-in) into the search path and reload."""
        path = self.units / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if self.running:
            self.systemctl("daemon-reload")
        return path

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        values: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop every unit and the manager (``systemctl --user exit``), killing it if it hangs."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.systemctl("exit", check=False, timeout_s=timeout_s)
        self._proc = None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def cgroup_dirs(self) -> list[Path]:
        """This manager's cgroup in every hierarchy it joined."""
        mounts = [
            Path(fields[1])
            for fields in (line.split() for line in Path("/proc/mounts").read_text().splitlines())
            if len(fields) > 2 and fields[2] in ("cgroup", "cgroup2")
        ]
        return [m / self.cgroup for m in mounts if (m / self.cgroup).is_dir()]

    def remove_cgroups(self) -> None:
        """Kill what is left in the manager's cgroups (only its own processes are there) and remove them."""
        for top in self.cgroup_dirs():
            for procs in sorted(top.rglob("cgroup.procs"), key=lambda p: -len(p.parts)):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                dirs = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda p: -len(p.parts))
                try:
                    for d in [*dirs, top]:
                        d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)

    def __enter__(self) -> UserManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.remove_cgroups()
