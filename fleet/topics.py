"""The fleet's MQTT topics, built and parsed by one helper (docs/fleet-protocol.md).

Every topic sits under a versioned prefix, ``<root>/v1``; ``root`` is ``ppchat`` unless a deployment
shares its broker between fleets. Device topics live in one subtree per device so a broker ACL can
say "a device writes only under its own id" (Mosquitto: ``pattern write ppchat/v1/devices/%u/#``)::

    ppchat/v1/rounds                       coordinator -> devices   round announcements, retained
    ppchat/v1/releases                     coordinator -> devices   global adapter releases, retained
    ppchat/v1/devices/<id>/update          device -> coordinator    sealed updates, QoS 1
    ppchat/v1/devices/<id>/status          device -> all            status, retained; last will "offline"
    ppchat/v1/devices/<id>/telemetry       device -> coordinator    non-sensitive telemetry
    ppchat/v1/devices/<id>/enroll          device -> coordinator    enrollment request
    ppchat/v1/devices/<id>/enrolled        coordinator -> device    enrollment reply

Only MQTT 3.1.1 features are used. Topics are ASCII; device ids are checked so they cannot contain
a wildcard or a level separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fleet.errors import TopicError

PROTOCOL_LEVEL = "v1"
"""The topic layout's version: a new layout gets a new prefix, so old and new fleets never mix."""

DEFAULT_ROOT = "ppchat"
MAX_DEVICE_ID_LENGTH = 64
MAX_TOPIC_LENGTH = 512
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROOT = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


class TopicKind(str, Enum):
    """What a topic carries; the value is its path below the prefix (``{}`` is the device id)."""

    ROUNDS = "rounds"
    RELEASES = "releases"
    UPDATE = "update"
    STATUS = "status"
    TELEMETRY = "telemetry"
    ENROLL = "enroll"
    ENROLLED = "enrolled"

    @property
    def per_device(self) -> bool:
        return self not in (TopicKind.ROUNDS, TopicKind.RELEASES)


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is 1-64 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit."""
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise TopicError(
            f"invalid device id {device_id!r}: 1-{MAX_DEVICE_ID_LENGTH} characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Topic:
    """A parsed topic: its kind and, for per-device kinds, the device id."""

    kind: TopicKind
    device_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind.per_device:
            if self.device_id is None:
                raise TopicError(f"topic {self.kind.value!r} needs a device id")
            validate_device_id(self.device_id)
        elif self.device_id is not None:
            raise TopicError(f"topic {self.kind.value!r} takes no device id")


@dataclass(frozen=True)
class TopicLayout:
    """Builds, parses and filters the fleet's topics under ``<root>/v1``."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if _ROOT.fullmatch(self.root) is None:
            raise TopicError(f"invalid topic root {self.root!r}: 1-32 characters of a-z 0-9 . _ -")

    @property
    def prefix(self) -> str:
        return f"{self.root}/{PROTOCOL_LEVEL}"

    def build(self, kind: TopicKind, device_id: str | None = None) -> str:
        """The topic for ``kind`` (and ``device_id`` for per-device kinds)."""
        topic = Topic(kind, device_id)
        if topic.device_id is None:
            return f"{self.prefix}/{kind.value}"
        return f"{self.prefix}/devices/{topic.device_id}/{kind.value}"

    def filter(self, kind: TopicKind) -> str:
        """The subscription filter matching ``kind`` for every device (``+`` in the device level)."""
        if kind.per_device:
            return f"{self.prefix}/devices/+/{kind.value}"
        return self.build(kind)

    def parse(self, topic: str) -> Topic:
        """Parse a received topic; raise :class:`TopicError` if it is not one of this layout's."""
        if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LENGTH:
            raise TopicError("topic is not a string of at most 512 characters")
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic[:80]!r} is not under {self.prefix!r}")
        levels = topic[len(head) :].split("/")
        if len(levels) == 1:
            try:
                kind = TopicKind(levels[0])
            except ValueError:
                raise TopicError(f"unknown topic {topic[:80]!r}") from None
            if kind.per_device:
                raise TopicError(f"topic {topic[:80]!r} lacks its device level")
            return Topic(kind)
        if len(levels) == 3 and levels[0] == "devices":
            try:
                kind = TopicKind(levels[2])
            except ValueError:
                raise TopicError(f"unknown device topic {topic[:80]!r}") from None
            if not kind.per_device:
                raise TopicError(f"topic {topic[:80]!r} is not a device topic")
            return Topic(kind, levels[1])
        raise TopicError(f"unknown topic {topic[:80]!r}")


DEFAULT_LAYOUT = TopicLayout()
