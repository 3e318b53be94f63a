"""``scripts/provision`` (``python -m agent.provision``): arguments, the bootstrap, the plan.

The bootstrap: on a fresh board the system's python3 has no pydantic, which the board profiles
need. Provisioning then runs the steps that need only the standard library (user, Debian
packages, venv), installs pydantic into the new venv and starts itself again with the venv's
python, which continues with the whole (idempotent) plan. A dry run on such a machine cannot read
the profiles either: it prints the bootstrap steps and says so.

Exit status: 0 done (or planned, with ``--dry-run``); 1 a step failed; 2 bad arguments;
3 a dry run that could not read the board profiles (pydantic missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.provision.errors import ProvisionError
from agent.provision.plan import STEP_NAMES, Options, Plan
from agent.provision.runner import Command, Runner, SystemRunner

BOOTSTRAPPED_ENV = "PPCHAT_PROVISION_BOOTSTRAPPED"
REPO = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/provision",
        description="Turn a board (or a mounted image's root) into a ppchat device. Idempotent.",
    )
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="the root to provision (default: this system)"
    )
    p.add_argument("--board", default=None, help="board profile (default: detected under --root)")
    p.add_argument(
        "--dry-run", action="store_true", help="print every step and the exact commands; change nothing"
    )
    p.add_argument(
        "--source", type=Path, default=None, help="the ppchat source tree (default: this checkout)"
    )
    p.add_argument(
        "--prefix", default="/opt/ppchat", help="install directory on the device (default /opt/ppchat)"
    )
    p.add_argument(
        "--device-name", default=None, help="the agent's device_name (default: the root's hostname)"
    )
    p.add_argument("--model-url", default=None, help="GGUF to install: https:// or file:// URL")
    p.add_argument("--model-sha256", default=None, help="its SHA-256 (a mismatch is refused)")
    p.add_argument("--model-name", default=None, help="file name on the device (default: from the URL)")
    p.add_argument("--model-max-bytes", type=int, default=None, help="refuse a larger download")
    p.add_argument("--broker-url", default=None, help="the fleet broker, mqtts://HOST:8883")
    p.add_argument("--broker-ca", type=Path, default=None, help="CA certificate of the fleet broker (PEM)")
    p.add_argument("--topic-root", default="ppchat", help="fleet topic root (default ppchat)")
    p.add_argument(
        "--enroll-token-file", type=Path, default=None, help="file holding a one-time enrollment token"
    )
    p.add_argument("--privacy-preset", default="moderate", help="minimal, moderate, high or maximum")
    p.add_argument("--torch-index-url", default=None, help="pip index for torch (default: per board)")
    p.add_argument("--torch-version", default=None, help="torch version (default: the newest the index has)")
    p.add_argument(
        "--extras", default="train,systemd", help="ppchat extras to install (default train,systemd)"
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="STEP",
        help=f"leave a step out (repeatable): {', '.join(STEP_NAMES)}",
    )
    p.add_argument(
        "--image", action="store_true", help="prepare a cloneable image: empty machine-id, refuse keys"
    )
    p.add_argument("--start", action="store_true", help="(re)start the agent when done (a live system)")
    p.add_argument("--python", default="python3", help="the device's python for the venv (default python3)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    source = args.source
    if source is None:
        source = REPO if (REPO / "pyproject.toml").exists() else Path(args.prefix) / "src"
    skip = frozenset(name.strip() for item in args.skip for name in item.split(",") if name.strip())
    return Options(
        root=args.root.resolve(),
        source=source.resolve(),
        board=args.board,
        prefix=args.prefix,
        device_name=args.device_name,
        model_url=args.model_url,
        model_sha256=args.model_sha256,
        model_name=args.model_name,
        model_max_bytes=args.model_max_bytes,
        broker_url=args.broker_url,
        broker_ca=args.broker_ca,
        topic_root=args.topic_root,
        enroll_token_file=args.enroll_token_file,
        privacy_preset=args.privacy_preset,
        torch_index_url=args.torch_index_url,
        torch_version=args.torch_version,
        extras=tuple(x for x in args.extras.split(",") if x),
        skip=skip,
        image=args.image,
        start=args.start,
        python=args.python,
    )


def make_plan(options: Options) -> Plan:
    """Resolve the board and build the plan (needs pydantic: the board profiles)."""
    from agent.provision.board import resolve_board, torch_source
    from agent.provision.steps import build_plan

    board = resolve_board(options.root, options.board)
    return build_plan(options, board, torch_source(board, options.torch_index_url))


def _bootstrap_commands(options: Options) -> list[Command]:
    """What the system python3 can do before the venv exists: packages, venv, pydantic into it."""
    from agent.provision.steps import BASE_PACKAGES, installed_packages

    installed = installed_packages(options.root) or set()
    missing = [p for p in BASE_PACKAGES if p not in installed]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    commands = []
    if missing:
        commands += [
            Command(("apt-get", "update"), env),
            Command(("apt-get", "install", "-y", "--no-install-recommends", *missing), env),
        ]
    if not Path(options.venv_python).exists():
        commands.append(Command((options.python, "-m", "venv", options.venv)))
    extra = ("tomli",) if sys.version_info < (3, 11) else ()
    commands.append(
        Command((options.venv_python, "-m", "pip", "install", "--upgrade", "pip", "pydantic>=2.7,<3", *extra))
    )
    return commands


def _bootstrap(options: Options, argv: Sequence[str], runner: Runner) -> int:
    commands = _bootstrap_commands(options)
    for command in commands:
        print(f"bootstrap $ {command.text()}", flush=True)
        runner.run(command)
    env = {**os.environ, BOOTSTRAPPED_ENV: "1", "PYTHONPATH": str(options.source)}
    print(f"bootstrap: continuing with {options.venv_python}", flush=True)
    os.execve(options.venv_python, [options.venv_python, "-m", "agent.provision", *argv], env)  # noqa: S606
    return 0  # pragma: no cover - execve does not return


def main(argv: Sequence[str] | None = None, *, runner: Runner | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        options = options_from(args)
        if importlib.util.find_spec("pydantic") is None:
            if args.dry_run or not options.live or os.environ.get(BOOTSTRAPPED_ENV):
                print(
                    "provision: this python has no pydantic, which the board profiles need.", file=sys.stderr
                )
                for command in _bootstrap_commands(options):
                    print(f"  bootstrap would run: {command.text()}", file=sys.stderr)
                print(
                    "  then the full plan with the venv's python. For an image (--root), run from a "
                    "checkout whose .venv is built (make venv).",
                    file=sys.stderr,
                )
                return 3
            return _bootstrap(options, argv, runner or SystemRunner())
        plan = make_plan(options)
        if args.dry_run:
            sys.stdout.write(plan.render(dry_run=True))
            return 0
        plan.execute(runner or SystemRunner())
        print("provision: done")
        return 0
    except ProvisionError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return exc.exit_code
