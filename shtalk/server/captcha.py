"""A CAPTCHA a person solves in a terminal: distorted ASCII-art text, checked server-side.

Why this design: shtalk's clients are terminals, so the challenge is text art (no images,
no network, no third-party service that would learn who registers).  The server draws
a random answer from an alphabet without look-alikes (no 0/O, 1/I/L, 2/Z, 5/S, 8/B,
6/G) with a small bitmap font of its own, then distorts it: every letter gets its own
ink character, vertical offset and shear, the baseline waves, pixels drop out, and noise
characters and a stroke are sprinkled over it.  Answers are case-insensitive (spaces
ignored), single use (the first answer, right or wrong, consumes the challenge),
expiring, and bound to the connection that asked for them.

What it stops and what not is in docs/SECURITY.md ("Account security").
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from random import Random
from typing import Any

from twisted.internet.interfaces import IReactorTime

ALPHABET = "ACDEFHJKMNPRTUVWXY3479"

# 5x7 glyphs, rows top to bottom.
FONT: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("#..#.", "#..#.", "#..#.", "#####", "...#.", "...#.", "...#."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
}

INK = "#@%&$MWHXK"
NOISE = ".,:;'`-~^*+"
ROWS = 7
HEIGHT = ROWS + 6


def render(text: str, rng: Random) -> str:
    """``text`` (letters of `ALPHABET`) as distorted ASCII art, lines joined by ``\\n``."""
    glyph_w = 10  # 5 columns, each drawn two characters wide
    width = 3 + len(text) * (glyph_w + 3) + 3
    canvas = [[" "] * width for _ in range(HEIGHT)]
    phase = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(0.6, 1.6)
    x = 2 + rng.randint(0, 2)
    for ch in text:
        glyph = FONT[ch]
        ink = rng.choice(INK)
        dy = rng.randint(0, 3)
        shear = rng.uniform(-0.25, 0.25)
        for row in range(ROWS):
            for col in range(5):
                if glyph[row][col] != "#":
                    continue
                for half in range(2):
                    if rng.random() < 0.06:
                        continue  # dropped pixel
                    cx = x + col * 2 + half + round(shear * (ROWS - row))
                    wave = amplitude * math.sin(phase + cx / 6.0)
                    cy = 1 + dy + row + round(wave)
                    if 0 <= cy < HEIGHT and 0 <= cx < width:
                        canvas[cy][cx] = ink if rng.random() > 0.1 else rng.choice(INK)
        x += glyph_w + rng.randint(1, 4)
    for y in range(HEIGHT):
        for cx in range(width):
            if canvas[y][cx] == " " and rng.random() < 0.07:
                canvas[y][cx] = rng.choice(NOISE)
    # A stroke through the text.
    y0 = rng.uniform(3, HEIGHT - 4)
    slope = rng.uniform(-0.08, 0.08)
    stroke = rng.choice("-~=")
    for cx in range(width):
        if rng.random() < 0.8:
            y = round(y0 + slope * cx)
            if 0 <= y < HEIGHT and canvas[y][cx] == " ":
                canvas[y][cx] = stroke
    return "\n".join("".join(line).rstrip() for line in canvas)


def normalise_answer(answer: str) -> str:
    return "".join(answer.split()).upper()


@dataclass(frozen=True, slots=True)
class _Challenge:
    answer: str
    owner: str
    expires: float


class CaptchaBook:
    """Outstanding challenges: issue, then check once.

    ``owner`` is an opaque per-connection token (``ShtalkServerProtocol.conn_token``);
    an answer from any other connection is refused.  At most ``per_owner`` live
    challenges per connection and ``max_total`` overall (oldest evicted), so asking
    for challenges cannot exhaust memory.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 120.0,
        length: int = 5,
        per_owner: int = 3,
        max_total: int = 20000,
        rng: Random | None = None,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.length = length
        self.per_owner = per_owner
        self.max_total = max_total
        self.rng: Random = rng if rng is not None else secrets.SystemRandom()
        self._live: OrderedDict[str, _Challenge] = OrderedDict()
        self.issued = 0
        self.solved = 0

    def issue(self, owner: str) -> dict[str, Any]:
        now = self.clock.seconds()
        self._expire(now)
        mine = [cid for cid, c in self._live.items() if c.owner == owner]
        for cid in mine[: max(0, len(mine) - self.per_owner + 1)]:
            del self._live[cid]
        while len(self._live) >= self.max_total:
            self._live.popitem(last=False)
        answer = "".join(self.rng.choice(ALPHABET) for _ in range(self.length))
        cid = "cap_" + secrets.token_urlsafe(12)
        self._live[cid] = _Challenge(answer, owner, now + self.ttl)
        self.issued += 1
        return {
            "id": cid,
            "art": render(answer, self.rng),
            "length": self.length,
            "expires_in": int(self.ttl),
            "hint": f"type the {self.length} characters drawn above (letters and digits)",
        }

    def check(self, owner: str, captcha: dict[str, Any] | None) -> bool:
        """True once for the right answer from the owning connection before expiry."""
        if not captcha:
            return False
        challenge = self._live.pop(str(captcha.get("id", "")), None)
        if challenge is None:
            return False
        if challenge.owner != owner or challenge.expires <= self.clock.seconds():
            return False
        given = normalise_answer(str(captcha.get("answer", "")))
        ok = secrets.compare_digest(given.encode(), challenge.answer.encode())
        if ok:
            self.solved += 1
        return ok

    def forget_owner(self, owner: str) -> None:
        """The connection closed: its challenges die with it."""
        for cid in [cid for cid, c in self._live.items() if c.owner == owner]:
            del self._live[cid]

    def _expire(self, now: float) -> None:
        while self._live:
            cid, c = next(iter(self._live.items()))
            if c.expires > now:
                break
            del self._live[cid]

    def answer_for_tests(self, cid: str) -> str:
        """The answer of a live challenge (tests only; a client can never ask this)."""
        return self._live[cid].answer
