"""The provisioning steps (see :mod:`agent.provision.plan` for the list), and :func:`build_plan`.

Each builder looks at the target first: a step with nothing to do says why and has no actions.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from agent.provision import units, users
from agent.provision.board import CUDA_NVCC, Board, TorchSource
from agent.provision.config_files import (
    CONFIG_DIR,
    STATE_DIR,
    agent_config_text,
    validate_agent_config,
)
from agent.provision.errors import ProvisionError
from agent.provision.fetch import fetch_verified
from agent.provision.plan import STEP_NAMES, Options, Plan, Step, Task
from agent.provision.runner import Command
from fleet.files import write_atomic, write_secret

BASE_PACKAGES = (
    "python3", "python3-venv", "python3-dev", "build-essential", "cmake", "git",
    "pkg-config", "ca-certificates", "libsystemd-dev",
)  # fmt: skip
CUDA_PACKAGES = ("libopenblas-dev",)
"""NVIDIA's torch wheels for Jetson link OpenBLAS; the CUDA toolkit itself comes with JetPack."""
SOURCE_PARTS = ("agent", "coordinator", "fleet", "hardware", "systemd", "deploy", "docs", "scripts")
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
LIVE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LLAMA_PIN_RE = re.compile(r'"llama-cpp-python==([0-9][0-9A-Za-z.+-]*)"')

# -- helpers ------------------------------------------------------------------------------------------


def llama_version(source: Path) -> str:
    """The llama-cpp-python version ppchat pins (``pyproject.toml``)."""
    try:
        text = (source / "pyproject.toml").read_text(encoding="utf-8")
    except OSError as exc:
        raise ProvisionError(f"cannot read {source}/pyproject.toml: {exc.strerror}") from None
    found = _LLAMA_PIN_RE.search(text)
    if found is None:
        raise ProvisionError("pyproject.toml pins no llama-cpp-python==VERSION")
    return found.group(1)


def installed_packages(root: Path) -> set[str] | None:
    """Debian packages installed in ``root`` (dpkg's status file), or None without one."""
    try:
        text = (root / "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    installed = set()
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            installed.add(fields["Package"].split(":")[0])
    return installed


def _stamp(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    return f"recorded in {path}"


def _stamp_matches(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except OSError:
        return False


def _owned(root: Path, path: Path, *, user: bool) -> str:
    """Give ``path`` to ppchat (``user``) or to root:ppchat; a note when the user does not exist."""
    ids = users.user_ids(root)
    if ids is None:
        return f"{path}: the ppchat user does not exist yet; left owned by root"
    uid, gid = ids
    os.chown(path, uid if user else 0, gid)
    return f"{path} owned by {'ppchat:ppchat' if user else 'root:ppchat'}"


def _write_if_changed(path: Path, text: str, *, mode: int) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            path.chmod(mode)
            return False
    except OSError:
        pass
    if path.exists():
        shutil.copy2(path, path.with_name(path.name + ".bak"))
    write_atomic(path, text.encode(), mode=mode)
    return True


# -- the steps ---------------------------------------------------------------------------------------


def _user_step(o: Options, b: Board) -> Step:
    step = Step(
        "user", "the ppchat system user and group" + (" (+ video, render for the GPU)" if b.cuda else "")
    )
    state = users.inspect(o.root, b.extra_groups)
    if state.absent_groups:
        step.notes.append(f"group(s) {', '.join(state.absent_groups)} do not exist here; not joined")
    if state.done:
        step.done = "user ppchat exists" + (f" in {', '.join(b.extra_groups)}" if b.extra_groups else "")
    elif o.live:
        step.actions += users.live_commands(state)
    else:
        step.actions.append(
            Task(
                f"add to {o.root}/etc/passwd, group, shadow, gshadow",
                lambda: users.apply_to_image(o.root, state),
            )
        )
    return step


def _packages_step(o: Options, b: Board) -> Step:
    wanted = [*BASE_PACKAGES, *(CUDA_PACKAGES if b.cuda else ())]
    step = Step("packages", "Debian packages: " + " ".join(wanted))
    installed = installed_packages(o.root)
    missing = wanted if installed is None else [p for p in wanted if p not in installed]
    if installed is None:
        step.notes.append(f"no dpkg status in {o.root}: installing all")
    if not missing:
        step.done = "all installed"
        return step
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    step.actions += [
        Command(("apt-get", "update"), env, o.chroot),
        Command(("apt-get", "install", "-y", "--no-install-recommends", *missing), env, o.chroot),
    ]
    if b.cuda and not o.target(CUDA_NVCC).exists():
        step.notes.append(f"{CUDA_NVCC} is missing: install JetPack's CUDA toolkit (nvidia-jetpack) first")
    return step


def _copy_source(o: Options) -> str:
    dest = o.target(o.source_dest)
    staging = dest.with_name(dest.name + ".new")
    if staging.exists():
        shutil.rmtree(staging)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache", "*.egg-info")
    staging.mkdir(parents=True)
    for part in SOURCE_PARTS:
        if (o.source / part).is_dir():
            shutil.copytree(o.source / part, staging / part, ignore=ignore, symlinks=True)
    for name in SOURCE_FILES:
        if (o.source / name).is_file():
            shutil.copy2(o.source / name, staging / name)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return f"copied to {dest}"


def _source_step(o: Options) -> Step:
    step = Step("source", f"the ppchat source tree to {o.source_dest}")
    if o.target(o.source_dest).resolve() == o.source.resolve():
        step.done = f"provisioning runs from {o.source_dest}"
    else:
        step.actions.append(
            Task(
                f"copy {', '.join(SOURCE_PARTS)} and pyproject.toml from {o.source}", lambda: _copy_source(o)
            )
        )
    return step


def _pip(o: Options, *args: str, env: dict[str, str] | None = None) -> Command:
    return Command(
        (o.venv_python, "-m", "pip", "install", *args),
        {"PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})},
        o.chroot,
    )


def _venv_step(o: Options) -> Step:
    step = Step("venv", f"the virtual environment {o.venv}")
    if o.target(o.venv_python).exists():
        step.done = f"{o.venv} exists"
        return step
    step.actions += [
        Command((o.python, "-m", "venv", o.venv), {}, o.chroot),
        _pip(o, "--upgrade", "pip", "wheel", "setuptools"),
    ]
    return step


def _torch_step(o: Options, torch: TorchSource) -> Step:
    spec = f"torch=={o.torch_version}" if o.torch_version else "torch"
    step = Step("torch", f"torch for the trainer: {torch.why}")
    stamp_path, stamp = o.target(f"{o.venv}/.ppchat-torch"), f"{spec} {torch.index_url or 'pypi'}\n"
    if _stamp_matches(stamp_path, stamp):
        step.done = f"{spec} from {torch.index_url or 'PyPI'}"
        return step
    index = ("--index-url", torch.index_url) if torch.index_url else ()
    step.actions += [
        _pip(o, spec, *index),
        Task("record the torch source", lambda: _stamp(stamp_path, stamp)),
    ]
    return step


def _llama_step(o: Options, b: Board) -> Step:
    version = llama_version(o.source)
    step = Step("llama", f"llama-cpp-python {version} built for {b.name}")
    step.notes.append(
        "built from source with --no-cache-dir --force-reinstall: pip's wheel cache ignores CMAKE_ARGS"
    )
    env = {"CMAKE_ARGS": b.cmake_args, "FORCE_CMAKE": "1"}
    if b.cuda:
        env.update(CUDACXX=CUDA_NVCC, PATH=f"/usr/local/cuda/bin:{LIVE_PATH}")
    stamp_path, stamp = o.target(f"{o.venv}/.ppchat-llama"), f"llama-cpp-python=={version} {b.cmake_args}\n"
    if _stamp_matches(stamp_path, stamp):
        step.done = f"built with these flags ({stamp_path})"
        return step
    if b.cuda:

        def check_cuda() -> str:
            if not o.target(CUDA_NVCC).exists():
                raise ProvisionError(f"{CUDA_NVCC} not found: install JetPack's CUDA toolkit first")
            return "found"

        step.actions.append(Task(f"check the CUDA compiler {CUDA_NVCC}", check_cuda))
    step.actions += [
        _pip(
            o,
            "--no-cache-dir",
            "--force-reinstall",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python=={version}",
            env=env,
        ),
        Task("record the build flags", lambda: _stamp(stamp_path, stamp)),
    ]
    return step


def _ppchat_step(o: Options) -> Step:
    extras = f"[{','.join(o.extras)}]" if o.extras else ""
    step = Step("ppchat", f"ppchat{extras} into the venv (llama-cpp-python and torch stay as built)")
    step.actions.append(_pip(o, f"{o.source_dest}{extras}"))
    return step


def _model_step(o: Options) -> Step:
    step = Step("model", "the model, pinned by SHA-256")
    if o.model_url is None or o.model_sha256 is None or o.model_path is None:
        step.done = "no --model-url given: set [model] path and sha256 in agent.toml later"
        return step
    url, sha, dest = o.model_url, o.model_sha256, o.target(o.model_path)

    def fetch() -> str:
        result = fetch_verified(url, sha, dest, mode=0o644, max_bytes=o.model_max_bytes)
        dest.parent.chmod(0o755)
        return f"{result.outcome.value}: {o.model_path} ({result.size} bytes, SHA-256 verified)"

    step.actions.append(Task(f"fetch {url} -> {o.model_path}, SHA-256 {sha}; refuse a mismatch", fetch))
    return step


def _config_step(o: Options, b: Board) -> Step:
    step = Step("config", f"{CONFIG_DIR}/agent.toml" + (" and the broker's CA" if o.broker_ca else ""))
    agent_text = agent_config_text(o, b)
    validate_agent_config(agent_text)
    files: list[tuple[Path, str]] = [(o.target(f"{CONFIG_DIR}/agent.toml"), agent_text)]
    if o.broker_ca is not None:
        try:
            files.append((o.target(f"{CONFIG_DIR}/broker-ca.pem"), o.broker_ca.read_text(encoding="utf-8")))
        except OSError as exc:
            raise ProvisionError(f"--broker-ca {o.broker_ca}: {exc.strerror}") from None
    step.notes += [
        f"agent.toml: {line}" for line in agent_text.splitlines() if line and not line.startswith("#")
    ]

    def current(path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return None

    if all(current(path) == text for path, text in files):
        step.done = "unchanged"
        return step

    def write() -> str:
        config_dir = o.target(CONFIG_DIR)
        config_dir.mkdir(parents=True, exist_ok=True)
        config_dir.chmod(0o750)
        notes = [_owned(o.root, config_dir, user=False)]
        for path, text in files:
            mode = 0o644 if path.name.endswith(".pem") else 0o640
            changed = _write_if_changed(path, text, mode=mode)
            notes.append(f"{path.name} {'written' if changed else 'unchanged'}")
            if mode == 0o640:
                _owned(o.root, path, user=False)
        return "; ".join(notes)

    step.actions.append(Task(f"write {', '.join(str(p) for p, _ in files)} (0640 root:ppchat)", write))
    return step


def _enroll_step(o: Options) -> Step:
    step = Step("enroll", "the one-time enrollment token for the first boot (0600, ppchat)")
    if o.enroll_token_file is None:
        step.done = "no --enroll-token-file: enroll later with a token from `coordinator devices add NAME`"
        return step
    try:
        token = o.enroll_token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ProvisionError(f"--enroll-token-file {o.enroll_token_file}: {exc.strerror}") from None
    if re.fullmatch(r"ppe1\.[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{22}", token) is None:
        raise ProvisionError(
            f"{o.enroll_token_file} does not hold an enrollment token (ppe1.<id>.<secret>.<pin>)"
        )
    dest = o.target(f"{CONFIG_DIR}/enroll-token")
    try:
        if dest.read_text(encoding="utf-8").strip() == token:
            step.done = f"token {token[:17]}... in place"
            return step
    except OSError:
        pass

    def write() -> str:
        write_secret(dest, (token + "\n").encode())
        return _owned(o.root, dest, user=True)

    step.actions.append(
        Task(f"write {CONFIG_DIR}/enroll-token ({token[:17]}..., the secret is not shown)", write)
    )
    return step


def _image_step(o: Options) -> Step:
    step = Step("image", "prepare a cloneable image: an empty machine-id, no device keys")
    if not o.image:
        step.done = "not an image (--image not given)"
        return step
    keys = o.target(f"{STATE_DIR}/keys")

    def check_keys() -> str:
        if keys.exists() and any(keys.iterdir()):
            raise ProvisionError(
                f"{keys} holds device keys: an image must not carry them (every clone would share one "
                "identity). Remove the directory; each device makes its own keys at first boot."
            )
        return "no device keys in the image"

    def clear_machine_id() -> str:
        path = o.target("/etc/machine-id")
        path.write_text("")
        return f"{path} emptied: systemd makes a new one at each clone's first boot"

    step.actions += [
        Task(f"check that {STATE_DIR}/keys is empty", check_keys),
        Task("empty /etc/machine-id", clear_machine_id),
    ]
    return step


def _units_step(o: Options, b: Board) -> Step:
    files = units.unit_files(o.source, cuda=b.cuda, prefix=o.prefix)
    step = Step("units", "systemd units: " + ", ".join(f.name for f in files))
    systemd_running = o.live and Path("/run/systemd/system").is_dir()
    changed, unlinked = units.pending(o.root, files), units.links_missing(o.root, files)

    def install() -> str:
        written = units.install(o.root, files)
        linked = units.enable(o.root, files)
        return f"written: {', '.join(written) or 'none'}; enabled: {', '.join(linked) or 'already'}"

    if changed or unlinked:
        what = ", ".join(changed) or "nothing new"
        step.actions.append(
            Task(f"install {what} into /{units.UNIT_DIR}; enable {', '.join(units.ENABLED)}", install)
        )
        if systemd_running:
            step.actions.append(Command(("systemctl", "daemon-reload")))
    if systemd_running and o.start:
        step.actions.append(Command(("systemctl", "restart", *units.ENABLED)))
    elif o.start:
        step.notes.append("--start ignored: no running systemd for this root")
    if not step.actions:
        step.done = "installed and enabled"
    return step


def _verify_step(o: Options) -> Step:
    step = Step("verify", f"systemd-analyze verify; the agent's exposure at most {units.MAX_EXPOSURE}")
    if shutil.which("systemd-analyze") is None:
        step.done = "systemd-analyze is not installed here: not checked"
        return step
    if not o.live and not units.has_systemd_units(o.root):
        step.done = f"{o.root} has no systemd units of its own (not an OS root): not checked"
        return step

    def check() -> str:
        units.verify(o.root, list(units.AGENT_UNITS))
        score = units.exposure(o.root, units.AGENT_UNITS[0])
        if score > units.MAX_EXPOSURE:
            raise ProvisionError(f"ppchat-agent.service exposure {score} is above {units.MAX_EXPOSURE}")
        return f"verified; ppchat-agent.service exposure {score}"

    step.actions.append(Task("systemd-analyze verify and security --offline=true", check))
    return step


def build_plan(o: Options, board: Board, torch: TorchSource) -> Plan:
    """Every step for ``o`` on ``board``, each already knowing whether it has anything to do."""
    builders: dict[str, Callable[[], Step]] = {
        "user": lambda: _user_step(o, board),
        "packages": lambda: _packages_step(o, board),
        "source": lambda: _source_step(o),
        "venv": lambda: _venv_step(o),
        "torch": lambda: _torch_step(o, torch),
        "llama": lambda: _llama_step(o, board),
        "ppchat": lambda: _ppchat_step(o),
        "model": lambda: _model_step(o),
        "config": lambda: _config_step(o, board),
        "enroll": lambda: _enroll_step(o),
        "image": lambda: _image_step(o),
        "units": lambda: _units_step(o, board),
        "verify": lambda: _verify_step(o),
    }
    steps = []
    for name in STEP_NAMES:
        if name in o.skip:
            steps.append(Step(name, "skipped", skipped=True))
        else:
            steps.append(builders[name]())
    return Plan(o, board, torch, steps)
