"""Board profiles, detection and sensors (sysfs readers that take a root path).

    profile.py      BoardProfile models; the data in profiles/*.toml; cmake_args() for provisioning
    detect.py       detect(root, override=...) -> Detection(profile, evidence, reasons, warnings)
    sensors/        power, thermal, system (psutil), activity: Protocols with sysfs implementations
    sysfs.py        small tolerant readers: a missing file is None (unknown), never a guess
    crossbuild.py   cross-compile llama.cpp for the Pi profiles and run it under qemu (the proof)
    errors.py       HardwareError, ProfileError, CrossBuildError

``python -m hardware`` prints what this machine is detected as and what its sensors read.
Nothing here imports the agent: the scheduler (``agent/scheduler.py``) uses this package.
"""
