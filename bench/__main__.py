"""Run every benchmark in bench/, each in its own process, and summarise.

Each benchmark prints its ratio against a baseline measured side by side in the same process, and
its target; it exits 1 when the target is missed. ``python -m bench NAME ...`` runs only those.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = [m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")]
    if argv:
        unknown = sorted(set(argv) - set(names))
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(sorted(names))}")
            return 2
        names = argv
    results: list[tuple[str, int, float]] = []
    for name in sorted(names):
        print(f"\n=== bench.{name}", flush=True)
        start = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{name}"])
        results.append((name, rc, time.monotonic() - start))
    print("\n=== summary")
    for name, rc, secs in results:
        verdict = "target met" if rc == 0 else ("target MISSED" if rc == 1 else f"error (exit {rc})")
        print(f"  {name:24s} {verdict:16s} {secs:6.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
