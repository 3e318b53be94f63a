"""Provisioning: turn a freshly flashed board (or a mounted image's root) into a ppchat device.

    scripts/provision --board raspberry-pi-5 --model-url URL --model-sha256 HEX [--dry-run] ...
    python -m agent.provision --help

    cli.py       arguments, the bootstrap (system python3 -> the venv), printing and running the plan
    plan.py      Options, Step, Plan: steps of actions, commands (through a Runner) or Python tasks
    steps.py     each step, looking at the target first (idempotent), and build_plan()
    config_files.py  the text of /etc/ppchat/agent.toml, checked by the agent's own parser
    units.py     installing, enabling and checking (systemd-analyze) the systemd units
    board.py     the board profile: detection or --board, llama.cpp's CMAKE_ARGS, torch's source
    runner.py    the Runner seam (subprocess, chroot for --root) and the Command it runs
    users.py     the ppchat system user and groups (useradd on a live system, file edits in an image)
    fetch.py     downloads pinned by SHA-256 (https://, file://): temp file, verify, atomic rename
    tomlw.py     a small TOML writer for the config files

Everything but :mod:`agent.provision.board` and the config validation runs on the standard library
alone, because provisioning starts with the system's python3 before the venv (and pydantic)
exists (docs/operations.md, "A fresh board: the bootstrap").
"""
