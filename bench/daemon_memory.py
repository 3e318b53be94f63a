"""Resident memory of the daemon without a model, and proof that torch is not imported in it.

Starts a real ``agent run --no-model`` (everything the daemon imports, llama.cpp's library
included, but no weights), waits until its socket answers, then reads its RSS from /proc, the
daemon's own list of heavy modules in ``sys.modules`` (its status snapshot), and its memory map.

    python -m bench.daemon_memory

Target: RSS <= 80 MB, and torch (peft, opacus, transformers) not loaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.client import AgentClient
from agent.errors import AgentError
from agent.status import read_snapshot

TARGET_BYTES = 80 * 1000 * 1000


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="ppchat-mem-"))
    config = directory / "agent.toml"
    config.write_text(f'[paths]\nstate_dir = "{directory / "state"}"\nruntime_dir = "{directory / "run"}"\n')
    socket_path = directory / "run" / "agent.sock"
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config), "--no-model"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(f"bench: agent run exited with {proc.returncode}: {err}")
            try:
                with AgentClient.connect(socket_path, timeout=5.0) as client:
                    for _ in range(20):
                        client.ping()
                break
            except (AgentError, OSError):
                if time.monotonic() > deadline:
                    raise SystemExit("bench: the daemon did not answer") from None
                time.sleep(0.05)
        time.sleep(0.5)
        rss = _rss_bytes(proc.pid)
        snap = read_snapshot(directory / "run" / "status.json")
        heavy = snap.heavy_modules_loaded if snap is not None else None
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        libllama = "libllama" in maps
        libtorch = "libtorch" in maps
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    mib = rss / 2**20
    print(f"daemon without a model: RSS {rss / 1e6:.1f} MB ({mib:.1f} MiB); libllama mapped: {libllama}")
    print(f"heavy modules in the daemon's sys.modules: {list(heavy) if heavy is not None else 'unknown'}")
    print(f"libtorch mapped in the daemon: {libtorch}")
    ok = rss <= TARGET_BYTES and heavy == () and not libtorch and code == 0
    verdict = "OK" if ok else "MISSED"
    print(f"daemon_memory {rss / 1e6:.1f} MB (target <= {TARGET_BYTES / 1e6:.0f} MB, no torch) {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
