"""A QR code drawn with Unicode half blocks (two modules per character cell).

Uses the ``qrcode`` package when it is installed (the TOTP enrolment adds it); without it
the enrolment screen shows the ``otpauth://`` URI and the key to type by hand.
"""

from __future__ import annotations

import importlib
from typing import Any


def qr_matrix(data: str) -> list[list[bool]] | None:
    try:
        qrcode: Any = importlib.import_module("qrcode")
    except ImportError:
        return None
    code = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_L)
    code.add_data(data)
    code.make(fit=True)
    return [[bool(x) for x in row] for row in code.get_matrix()]


def draw(matrix: list[list[bool]]) -> str:
    """Dark modules as spaces on a light block, so it scans on dark and light themes."""
    rows = list(matrix)
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    out = []
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        line = []
        for a, b in zip(top, bottom, strict=True):
            line.append({(False, False): "\u2588", (True, False): "\u2584",
                         (False, True): "\u2580", (True, True): " "}[(a, b)])
        out.append("".join(line))
    return "\n".join(out)


def qr_text(data: str) -> str:
    if not data:
        return ""
    matrix = qr_matrix(data)
    return draw(matrix) if matrix is not None else ""
