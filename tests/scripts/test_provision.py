"""scripts/provision: the dry run for every board, and a real run into a temporary OS root.

In the real run every file step runs for real (user and groups, source copy, the model fetched over
file:// and verified, the config, the token, the units, systemd-analyze); only commands (apt-get,
python -m venv, pip) go to a fake runner, which records them.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.provision import units
from agent.provision.board import JETSON_TORCH_INDEX, PYTORCH_CPU_INDEX
from agent.provision.steps import BASE_PACKAGES
from fleet.enrollment import EnrollmentToken
from fleet.keys import Identity, Role
from hardware.profile import Accelerator, cmake_args, get_profile, profile_names
from tests.hardware.sysfs_trees import ORIN_NANO, PI5_GOOD, tree
from tests.scripts.provision_support import REPO, FakeRunner, make_os_root, provision, sha256

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="provisioning targets Linux")


def _llama_command(runner_texts: list[str]) -> str:
    found = [t for t in runner_texts if "llama-cpp-python==" in t]
    assert len(found) == 1, runner_texts
    return found[0]


# -- dry runs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("board", profile_names())
def test_dry_run_prints_each_boards_plan(tmp_path: Path, board: str) -> None:
    profile = get_profile(board)
    root = tmp_path / "root"
    root.mkdir()
    result = provision(["--root", str(root), "--board", board, "--dry-run"])
    assert result.code == 0, result.err
    out = result.out
    flags = cmake_args(profile, memory_mb=None)
    assert f"CMAKE_ARGS={shlex.quote(flags)}" in out
    llama = next(line for line in out.splitlines() if "llama-cpp-python==" in line)
    assert "--no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python" in llama
    assert f"CMAKE_ARGS={shlex.quote(flags)}" in llama
    torch = next(line for line in out.splitlines() if "pip install torch" in line)
    if profile.build.accelerator is Accelerator.CUDA:
        assert "GGML_CUDA=ON" in flags and f"--index-url {JETSON_TORCH_INDEX['R36']}" in torch
        assert "CUDACXX=/usr/local/cuda/bin/nvcc" in llama
        assert "(+ video, render for the GPU)" in out and "50-jetson-gpu.conf" in out
        assert "libopenblas-dev" in out
    elif profile.arch.value == "x86_64":
        assert f"--index-url {PYTORCH_CPU_INDEX}" in torch
    else:
        assert "--index-url" not in torch and "50-jetson-gpu.conf" not in out
    if board.startswith("raspberry-pi"):
        assert "GGML_NATIVE=OFF" in flags and "GGML_CPU_ARM_ARCH=armv8" in flags
    for step in ("user", "packages", "venv", "torch", "llama", "ppchat", "config", "units", "verify"):
        assert f"] {step}: " in out
    assert list(root.iterdir()) == [], "a dry run changed the root"


def test_pi4_and_pi5_get_different_arm_targets(tmp_path: Path) -> None:
    outs = {
        b: provision(["--root", str(tmp_path), "--board", b, "--dry-run"]).out
        for b in ("raspberry-pi-4", "raspberry-pi-5")
    }
    assert "GGML_CPU_ARM_ARCH=armv8-a'" in outs["raspberry-pi-4"]
    assert "GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16'" in outs["raspberry-pi-5"]


def test_dry_run_detects_the_board_under_the_root(tmp_path: Path) -> None:
    root = make_os_root(tmp_path / "root", jetson_tree=tree(PI5_GOOD))
    result = provision(["--root", str(root), "--dry-run"])
    assert result.code == 0, result.err
    assert "board:     raspberry-pi-5 (Raspberry Pi 5, aarch64, " in result.out
    assert "compatible" in result.out


def test_an_image_without_board_says_to_pass_one(tmp_path: Path) -> None:
    result = provision(["--root", str(tmp_path), "--dry-run"])
    assert result.code == 1 and "pass --board" in result.err


def test_the_shell_wrapper_runs_a_dry_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts/provision"), "--board", "raspberry-pi-5", "--root", str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-url", "file:///m.gguf"], "go together"),
        (["--model-url", "ftp://x/m.gguf", "--model-sha256", "0" * 64], "only https://"),
        (["--model-url", "file:///m.gguf", "--model-sha256", "XYZ"], "64 lowercase hex"),
        (["--broker-url", "http://broker:1883"], "mqtts://"),
        (["--skip", "nonsense"], "unknown step"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = provision(["--root", str(tmp_path), "--board", "raspberry-pi-5", *args])
    assert result.code == 1 and message in result.err


# -- a run into a temporary root ------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, str]:
    token = str(EnrollmentToken.generate(Identity.generate(Role.COORDINATOR).public))
    path = tmp_path / "token.txt"
    path.write_text(token + "\n")
    return path, token


def _run_args(root: Path, model: Path, token: Path, *extra: str) -> list[str]:
    ca = root.parent / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB...test...\n-----END CERTIFICATE-----\n")
    return [
        "--root", str(root),
        "--model-url", model.as_uri(),
        "--model-sha256", sha256(model),
        "--broker-url", "mqtts://fleet.example.net:8883",
        "--broker-ca", str(ca),
        "--enroll-token-file", str(token),
        "--privacy-preset", "high",
        *extra,
    ]  # fmt: skip


def test_provision_a_pi_image_root(tmp_path: Path, demo_model: Any, token_file: tuple[Path, str]) -> None:
    root = make_os_root(tmp_path / "root")
    runner = FakeRunner(root)
    result = provision(_run_args(root, demo_model.q4_k_m, token_file[0], "--board", "raspberry-pi-4"), runner)
    assert result.code == 0, result.out + result.err

    # Commands, in the root (chroot), with the Pi 4's exact build flags.
    texts = runner.texts()
    assert any(t.startswith(f"DEBIAN_FRONTEND=noninteractive chroot {root} apt-get install") for t in texts)
    assert f"chroot {root} python3 -m venv /opt/ppchat/.venv" in texts
    llama = _llama_command(texts)
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a'" in llama
    assert texts[-1].endswith("-m pip install '/opt/ppchat/src[train,systemd]'")

    # The user and group, made by editing the image's files.
    passwd = (root / "etc/passwd").read_text()
    line = next(x for x in passwd.splitlines() if x.startswith("ppchat:"))
    uid, gid = int(line.split(":")[2]), int(line.split(":")[3])
    assert 100 <= uid <= 999 and line.endswith(":/var/lib/ppchat:/usr/sbin/nologin")
    assert f"ppchat:x:{gid}:" in (root / "etc/group").read_text()
    assert "ppchat:!*:" in (root / "etc/shadow").read_text()
    assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == 0o640
    assert "video:x:44:\n" in (root / "etc/group").read_text()  # a Pi's agent needs no GPU group

    # The model, fetched over file:// and verified.
    model = root / "opt/ppchat/models" / demo_model.q4_k_m.name
    assert sha256(model) == sha256(demo_model.q4_k_m)
    assert stat.S_IMODE(model.stat().st_mode) == 0o644

    # The config loads in the agent, with the profile's runtime settings.
    config = load_config(root / "etc/ppchat/agent.toml")
    assert config.model.path == Path("/opt/ppchat/models") / demo_model.q4_k_m.name
    assert config.model.sha256 == sha256(demo_model.q4_k_m)
    assert (config.model.n_threads, config.model.n_ctx, config.model.n_gpu_layers) == (4, 2048, 0)
    assert config.hardware.profile == "raspberry-pi-4" and config.privacy.preset.value == "high"
    assert config.device_name == "kitchen-pi"
    assert str(config.paths.state_dir) == "/var/lib/ppchat" and str(config.paths.runtime_dir) == "/run/ppchat"
    agent_toml = (root / "etc/ppchat/agent.toml").stat()
    assert stat.S_IMODE(agent_toml.st_mode) == 0o640 and (agent_toml.st_uid, agent_toml.st_gid) == (0, gid)
    fleet = config.fleet
    assert (
        fleet.enabled
        and fleet.broker_url == "mqtts://fleet.example.net:8883"
        and fleet.topic_root == "ppchat"
    )
    assert fleet.tls_ca_path == Path("/etc/ppchat/broker-ca.pem")
    assert fleet.enrollment_token_path == Path("/etc/ppchat/enroll-token")
    assert fleet.username is None and fleet.password is None and fleet.password_path is None
    assert (root / "etc/ppchat/broker-ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")

    # The token, for the first boot only: ppchat's, 0600.
    token = (root / "etc/ppchat/enroll-token").stat()
    assert stat.S_IMODE(token.st_mode) == 0o600 and (token.st_uid, token.st_gid) == (uid, gid)
    assert token_file[1] not in result.out, "the token's secret was printed"
    assert not (root / "var/lib/ppchat/keys").exists(), "keys are made at first boot, never here"

    # Units installed, enabled, verified, and within the exposure bound.
    unit_dir = root / "etc/systemd/system"
    for name in units.AGENT_UNITS:
        assert (unit_dir / name).read_text() == (REPO / "systemd" / name).read_text()
    link = unit_dir / "multi-user.target.wants/ppchat-agent.service"
    assert os.readlink(link) == "/etc/systemd/system/ppchat-agent.service"
    assert not (unit_dir / "ppchat-agent.service.d").exists()
    units.verify(root, list(units.AGENT_UNITS))
    score = units.exposure(root, "ppchat-agent.service")
    print(f"\nppchat-agent.service exposure (provisioned Pi root): {score}")
    assert score <= units.MAX_EXPOSURE
    assert f"ppchat-agent.service exposure {score}" in result.out
    assert (root / "opt/ppchat/src/agent/provision/plan.py").is_file()

    # Idempotent: a second run has nothing to do but reinstall ppchat itself.
    again = FakeRunner(root)
    second = provision(_run_args(root, demo_model.q4_k_m, token_file[0], "--board", "raspberry-pi-4"), again)
    assert second.code == 0, second.err
    assert [c.argv[-1] for c in again.commands] == ["/opt/ppchat/src[train,systemd]"]
    for step in ("user", "packages", "venv", "torch", "llama", "config", "enroll", "units"):
        assert f"] {step}: " in second.out
    assert second.out.count("nothing to do:") >= 9, second.out
    assert "already present: /opt/ppchat/models/" in second.out


def test_provision_a_jetson_root_detected(
    tmp_path: Path, demo_model: Any, token_file: tuple[Path, str]
) -> None:
    root = make_os_root(tmp_path / "root", jetson_tree=tree(ORIN_NANO))
    (root / "usr/local/cuda/bin").mkdir(parents=True)
    (root / "usr/local/cuda/bin/nvcc").write_text("#!/bin/sh\n")
    runner = FakeRunner(root)
    result = provision(_run_args(root, demo_model.q4_k_m, token_file[0]), runner)
    assert result.code == 0, result.out + result.err
    assert "board:     jetson-orin-nano" in result.out
    llama = _llama_command(runner.texts())
    assert "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87" in llama and "CUDACXX=" in llama
    torch = next(t for t in runner.texts() if "install torch" in t)
    assert f"--index-url {JETSON_TORCH_INDEX['R36']}" in torch
    for group in ("video", "render"):
        assert any(
            x.startswith(f"{group}:") and x.endswith(":ppchat")
            for x in (root / "etc/group").read_text().splitlines()
        )
    dropin = root / "etc/systemd/system/ppchat-agent.service.d/50-jetson-gpu.conf"
    assert "DeviceAllow=/dev/nvmap rw" in dropin.read_text()
    config = load_config(root / "etc/ppchat/agent.toml")
    assert config.model.n_gpu_layers == -1 and config.hardware.profile == "jetson-orin-nano"
    score = units.exposure(root, "ppchat-agent.service")  # with the drop-in: the GPU nodes, no MDWE
    print(f"\nppchat-agent.service exposure (provisioned Jetson root, with the GPU drop-in): {score}")
    assert score <= units.MAX_EXPOSURE


def test_a_model_with_the_wrong_sha256_is_refused(tmp_path: Path, demo_model: Any) -> None:
    root = make_os_root(tmp_path / "root")
    wrong = "0" * 64
    args = ["--root", str(root), "--board", "raspberry-pi-5", "--model-url", demo_model.q8_0.as_uri()]
    result = provision([*args, "--model-sha256", wrong], FakeRunner(root))
    assert result.code == 1
    assert "SHA-256 is" in result.err and "refusing it" in result.err
    models = root / "opt/ppchat/models"
    assert not models.exists() or list(models.iterdir()) == [], "a partial or wrong model was left behind"
    assert not (root / "etc/ppchat/agent.toml").exists(), "provisioning went on after the mismatch"


def test_image_mode_refuses_baked_keys_and_empties_the_machine_id(tmp_path: Path) -> None:
    root = make_os_root(tmp_path / "root")
    Identity.generate(Role.DEVICE).save(root / "var/lib/ppchat/keys")
    skip = ["--skip", "packages,venv,torch,llama,ppchat,verify"]
    result = provision(["--root", str(root), "--board", "raspberry-pi-5", "--image", *skip], FakeRunner(root))
    assert result.code == 1 and "must not carry them" in result.err
    for entry in (root / "var/lib/ppchat/keys").iterdir():
        entry.unlink()
    result = provision(["--root", str(root), "--board", "raspberry-pi-5", "--image", *skip], FakeRunner(root))
    assert result.code == 0, result.err
    assert (root / "etc/machine-id").read_text() == ""


def test_skipped_steps_run_nothing(tmp_path: Path) -> None:
    root = make_os_root(tmp_path / "root")
    runner = FakeRunner(root)
    skip = ["--skip", "user,packages,venv,torch,llama,ppchat,verify"]
    result = provision(["--root", str(root), "--board", "generic-arm64", *skip], runner)
    assert result.code == 0, result.err
    assert runner.commands == []
    assert "ppchat:" not in (root / "etc/passwd").read_text()
    assert "the ppchat user does not exist yet" in result.out
    assert (root / "etc/ppchat/agent.toml").exists()
    assert set(BASE_PACKAGES) >= {"python3-venv", "cmake"}
