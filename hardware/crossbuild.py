"""Cross-compile llama.cpp for an ARM board profile and run it under qemu: the profiles' flags, proven.

The sources are the ones the project pins: ``vendor/llama.cpp`` of the llama-cpp-python sdist
(:data:`LLAMA_CPP_PYTHON_VERSION`). The build uses Debian's ``aarch64-linux-gnu`` GCC, the profile's
own CMake flags (:func:`hardware.profile.cmake_flags`) plus what a portable test binary needs: a
static link (so qemu-user needs no sysroot), OpenMP off (ggml's own thread pool instead of
``libgomp``), no OpenSSL, no tests/tools/server, and ccache. Only ``llama-simple`` is built: it
loads a GGUF and generates tokens, which is where an illegal instruction shows (at the first
decode, not at load).

Each build is cached under ``~/.cache/ppchat/cross/<key>/`` (``$PPCHAT_CACHE_DIR/cross`` when set),
where the key hashes the sdist, the flags and the compiler, so a re-run takes seconds.

Run under ``qemu-aarch64 -cpu cortex-a72`` (Pi 4) or ``-cpu cortex-a76`` (Pi 5); qemu's default CPU
(``max``) has every feature and would hide the hazard, so :func:`run_generation` always names one.

    python -m hardware.crossbuild raspberry-pi-4 OUTDIR         # build, copy llama-simple to OUTDIR
    python -m hardware.crossbuild --matrix MODEL.gguf OUTDIR    # build both Pis, run the 2x2 matrix
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hardware.errors import CrossBuildError, ProfileError
from hardware.profile import Accelerator, Arch, BoardProfile, cmake_flags, get_profile

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGET = "llama-simple"
DEBIAN_PACKAGES = ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "qemu-user", "cmake", "ccache")
CROSS_CC = "aarch64-linux-gnu-gcc"
CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
_BUILD_FORMAT = 1
"""Bumped when the build recipe changes, so old cache entries are not reused."""

# What a portable, self-contained test binary needs on top of the profile's flags.
CROSS_FLAGS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "CMAKE_EXE_LINKER_FLAGS": "-static",
    "GGML_OPENMP": "OFF",
    "GGML_CCACHE": "OFF",
    "CMAKE_C_COMPILER_LAUNCHER": "ccache",
    "CMAKE_CXX_COMPILER_LAUNCHER": "ccache",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_EXAMPLES": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_TOOLS": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
}

_TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER {cc})
set(CMAKE_CXX_COMPILER {cxx})
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CrossBuild(_Frozen):
    profile: str
    key: str
    binary: Path
    flags: dict[str, str]
    configure_s: float
    build_s: float
    cached: bool
    """Found in the cache: nothing was compiled this time."""


class QemuRun(_Frozen):
    cpu: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that killed the program (qemu-user re-raises the guest's), if any."""
        if self.returncode < 0:
            return signal.Signals(-self.returncode)
        return None

    @property
    def illegal_instruction(self) -> bool:
        return self.signal is signal.SIGILL


def cache_dir() -> Path:
    """``$PPCHAT_CACHE_DIR/cross`` or ``~/.cache/ppchat/cross`` (the demo model's cache sits beside it)."""
    base = os.environ.get("PPCHAT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "ppchat") / "cross"


def missing_tools() -> list[str]:
    """Programs the cross-build and the qemu matrix need that are not on PATH."""
    return [tool for tool in (CROSS_CC, CROSS_CXX, QEMU, "cmake", "ccache") if shutil.which(tool) is None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(directory: Path, *, log: Log = _stderr) -> Path:
    """The llama-cpp-python sdist in ``directory``, downloaded with pip (PyPI) when absent."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    path = directory / name
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not path.is_file():
        raise CrossBuildError(f"pip download of the sdist failed: {done.stderr.strip()[-2000:]}")
    return path


def source_tree(sdist: Path, *, log: Log = _stderr) -> tuple[Path, str]:
    """(vendor/llama.cpp extracted once from ``sdist``, the sdist's sha256)."""
    digest = _sha256(sdist)
    root = cache_dir() / "src" / digest[:16]
    marker = root / ".extracted"
    if not marker.exists():
        log(f"extracting {sdist.name}")
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
        marker.touch()
    found = sorted(root.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise CrossBuildError(f"{sdist} has no vendor/llama.cpp")
    return found[0].parent, digest


def _compiler_version() -> str:
    done = subprocess.run([CROSS_CXX, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else "unknown"


def cross_flags(profile: BoardProfile) -> dict[str, str]:
    """The profile's flags plus :data:`CROSS_FLAGS`; only CPU-only aarch64 profiles cross-build."""
    if profile.arch is not Arch.AARCH64:
        raise CrossBuildError(f"{profile.name} is not an aarch64 profile")
    if profile.build.accelerator is not Accelerator.NONE:
        raise CrossBuildError(f"{profile.name} builds CUDA: compile-check it with scripts/build-jetson-check")
    flags = cmake_flags(profile)
    if flags.get("GGML_NATIVE") != "OFF":
        raise CrossBuildError(f"{profile.name} builds natively on the machine itself: nothing to cross-build")
    return {**flags, **CROSS_FLAGS}


def build_key(flags: dict[str, str], *, sdist_sha256: str, compiler: str) -> str:
    blob = json.dumps(
        {
            "format": _BUILD_FORMAT,
            "flags": flags,
            "sdist": sdist_sha256,
            "compiler": compiler,
            "target": TARGET,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _run_logged(command: Sequence[str], log_path: Path, *, env: dict[str, str]) -> None:
    with log_path.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise CrossBuildError(f"{command[0]} failed (exit {done.returncode}); see {log_path}:\n{tail}")


def cross_build(
    profile_name: str,
    *,
    sdist: Path | None = None,
    jobs: int | None = None,
    log: Log = _stderr,
) -> CrossBuild:
    """Build (or find in the cache) ``llama-simple`` with ``profile_name``'s flags for aarch64."""
    try:
        profile = get_profile(profile_name)
    except ProfileError as exc:
        raise CrossBuildError(str(exc)) from None
    flags = cross_flags(profile)
    missing = missing_tools()
    if missing:
        raise CrossBuildError(
            f"missing {', '.join(missing)}; install the Debian packages {' '.join(DEBIAN_PACKAGES)}"
        )
    sdist = sdist if sdist is not None else fetch_sdist(cache_dir().parent / "sdist", log=log)
    source, sdist_sha = source_tree(sdist, log=log)
    key = build_key(flags, sdist_sha256=sdist_sha, compiler=_compiler_version())
    result_dir = cache_dir() / key
    manifest = result_dir / "build.json"
    if manifest.is_file() and (result_dir / TARGET).is_file():
        recorded = CrossBuild.model_validate_json(manifest.read_text())
        return recorded.model_copy(update={"cached": True, "binary": result_dir / TARGET})

    build_dir = cache_dir() / "build" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    toolchain = build_dir / "toolchain.cmake"
    toolchain.write_text(_TOOLCHAIN.format(cc=CROSS_CC, cxx=CROSS_CXX))
    env = {**os.environ, "CCACHE_BASEDIR": str(cache_dir())}
    configure = ["cmake", "-S", str(source), "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}"]
    configure += [f"-D{name}={value}" for name, value in flags.items()]
    log(f"configuring llama.cpp for {profile.name}: {' '.join(configure[6:])}")
    started = time.monotonic()
    _run_logged(configure, build_dir / "configure.log", env=env)
    configured = time.monotonic()
    jobs = jobs or os.cpu_count() or 1
    log(f"building {TARGET} with {jobs} jobs (log: {build_dir / 'build.log'})")
    _run_logged(
        ["cmake", "--build", str(build_dir), "--target", TARGET, "-j", str(jobs)],
        build_dir / "build.log",
        env=env,
    )
    built = time.monotonic()
    produced = build_dir / "bin" / TARGET
    if not produced.is_file():
        raise CrossBuildError(f"the build did not produce {produced}")
    result_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(produced, result_dir / TARGET)
    result = CrossBuild(
        profile=profile.name,
        key=key,
        binary=result_dir / TARGET,
        flags=flags,
        configure_s=round(configured - started, 1),
        build_s=round(built - configured, 1),
        cached=False,
    )
    manifest.write_text(result.model_dump_json(indent=2))
    return result


def run_generation(
    binary: Path,
    model: Path,
    *,
    cpu: str,
    n_predict: int = 4,
    prompt: str = "Hello",
    timeout_s: float = 600.0,
) -> QemuRun:
    """Generate ``n_predict`` tokens with ``binary`` under ``qemu-aarch64 -cpu CPU``."""
    env = {key: value for key, value in os.environ.items() if key != "QEMU_CPU"}
    command = [QEMU, "-cpu", cpu, str(binary), "-m", str(model), "-n", str(n_predict), prompt]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise CrossBuildError(f"{' '.join(command)} ran longer than {timeout_s:.0f} s") from None
    return QemuRun(cpu=cpu, returncode=done.returncode, stdout=done.stdout, stderr=done.stderr)


MATRIX_CPUS = ("cortex-a72", "cortex-a76")
MATRIX_PROFILES = ("raspberry-pi-4", "raspberry-pi-5")


def _describe(run: QemuRun) -> str:
    if run.returncode == 0:
        return "ok"
    if run.signal is not None:
        return run.signal.name
    return f"exit {run.returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cross-build-llama", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", nargs="?", help="an aarch64 CPU profile, e.g. raspberry-pi-4")
    parser.add_argument("outdir", type=Path, help="where llama-simple (and build.json) are copied")
    parser.add_argument(
        "--matrix", type=Path, metavar="MODEL", help="build both Pis and run MODEL on A72 and A76"
    )
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument(
        "--sdist", type=Path, default=None, help="a llama-cpp-python sdist (default: pip download)"
    )
    args = parser.parse_args(argv)
    profiles = MATRIX_PROFILES if args.matrix is not None else (args.profile,)
    if profiles == (None,):
        parser.error("name a profile, or use --matrix MODEL")
    try:
        for name in profiles:
            built = cross_build(name, sdist=args.sdist, jobs=args.jobs)
            target = args.outdir / name if args.matrix is not None else args.outdir
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built.binary, target / TARGET)
            (target / "build.json").write_text(built.model_dump_json(indent=2))
            how = "cached" if built.cached else f"configure {built.configure_s} s, build {built.build_s} s"
            print(f"{name}: {target / TARGET} ({how})")
            if args.matrix is not None:
                for cpu in MATRIX_CPUS:
                    run = run_generation(target / TARGET, args.matrix, cpu=cpu)
                    print(f"  {cpu}: {_describe(run)}")
    except CrossBuildError as exc:
        print(f"cross-build-llama: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
