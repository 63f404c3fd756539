"""Names people type: usernames, room names, device ids.

Names are NFKC-normalised so that look-alike forms (full-width letters,
ligatures) collapse to one spelling, then restricted to a small ASCII set
so that no two accounts can look the same on a terminal. The canonical key
(case-folded) is what uniqueness is decided on; the display form keeps the
case the owner chose.
"""

from __future__ import annotations

import re
import unicodedata

USERNAME_MIN = 3
USERNAME_MAX = 32
ROOM_MIN = 1
ROOM_MAX = 64
DEVICE_ID_MAX = 64
DEVICE_LABEL_MAX = 64

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_DEVICE_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}\Z")

USERNAME_RULE = (
    f"{USERNAME_MIN}-{USERNAME_MAX} characters: letters a-z, digits, '_', '.', '-'"
    " (compared case-insensitively)"
)
ROOM_RULE = (
    f"{ROOM_MIN}-{ROOM_MAX} characters: letters a-z, digits, '_', '.', '-',"
    " optionally written with a leading '#'"
)
DEVICE_RULE = "1-64 characters: letters, digits, '_', '-'"


class NameError_(ValueError):
    """A name outside the documented set; the message states the rule."""


def _normalise(raw: str, lo: int, hi: int, rule: str) -> str:
    name = unicodedata.normalize("NFKC", raw)
    if not (lo <= len(name) <= hi) or not _NAME_RE.match(name):
        raise NameError_(rule)
    if name[0] in ".-" or name[-1] in ".-":
        raise NameError_(rule + "; not starting or ending with '.' or '-'")
    return name


def normalise_username(raw: str) -> tuple[str, str]:
    """Return ``(display, key)`` for a username or raise NameError_."""
    name = _normalise(raw, USERNAME_MIN, USERNAME_MAX, USERNAME_RULE)
    return name, name.casefold()


def normalise_room(raw: str) -> tuple[str, str]:
    """Return ``(display, key)`` for a room name (a leading '#' is optional)."""
    if raw.startswith("#"):
        raw = raw[1:]
    name = _normalise(raw, ROOM_MIN, ROOM_MAX, ROOM_RULE)
    return name, name.casefold()


def check_device_id(raw: str) -> str:
    if not _DEVICE_RE.match(raw):
        raise NameError_(DEVICE_RULE)
    return raw


def clean_label(raw: str) -> str:
    """Device labels are free text shown in a terminal: strip control characters."""
    label = "".join(ch for ch in unicodedata.normalize("NFKC", raw) if ch.isprintable())
    return label[:DEVICE_LABEL_MAX].strip()
