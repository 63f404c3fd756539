"""A CAPTCHA a person solves in a terminal: distorted ASCII-art text, checked server-side.

Why this design: shtalk's clients are terminals, so the challenge is text art (no images,
no network, no third-party service that would learn who registers).  The server draws
a random answer from an alphabet without look-alikes (no 0/O, 1/I/L, 2/Z, 5/S, 8/B,
6/G) with a small bitmap font of its own, then distorts it: every letter gets its own
ink character (never a letter or digit, so the ink cannot be mistaken for the answer),
vertical offset and shear, the baseline waves, pixels drop out, and noise characters and
a stroke are sprinkled over it.  Answers are case-insensitive (spaces ignored), single use
(the first answer, right or wrong, consumes the challenge), expiring, and bound to the
connection that asked for them.

The accessible alternative (``kind="words"``, for screen-reader users) is a short
arithmetic question written in words, answered in digits or words.  It keeps the same
rules (single use, connection-bound, expiring) but is much weaker: about 100 possible
answers, and the question is machine-readable by design.

What it stops and what not is in docs/SECURITY.md ("Account security").
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from random import Random
from typing import Any

from twisted.internet.interfaces import IReactorTime

from shtalk.collaborators import collaborators

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

INK = "#@%&$"
NOISE = ".,:;'`-~^+"
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


def alphabet_hint(length: int) -> str:
    letters = " ".join(c for c in ALPHABET if c.isalpha())
    digits = " ".join(c for c in ALPHABET if c.isdigit())
    return (
        f"type the {length} characters drawn above. They are among the letters {letters} "
        f"and the digits {digits} (no look-alikes such as 0/O or 1/I); case does not matter"
    )


# -- the accessible alternative: a question in words ---------------------------------------
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0..199 in English words ("seventy-four", "one hundred and six")."""
    if n >= 100:
        rest = n - 100
        return "one hundred" + (f" and {number_words(rest)}" if rest else "")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | {
    w: 10 * i for i, w in enumerate(_TENS) if i >= 2
} | {"hundred": 100}


def parse_number(answer: str) -> int | None:
    """Digits, or 0..199 in words (hyphens, spaces and "and" optional); None otherwise."""
    text = answer.strip().lower()
    if text.isdigit():
        return int(text)
    words = [w for w in text.replace("-", " ").split() if w != "and"]
    if not words or any(w not in _WORD_VALUES for w in words):
        return None
    total = 0
    for w in words:
        value = _WORD_VALUES[w]
        if value == 100:
            total = max(total, 1) * 100
        else:
            total += value
    return total


def words_question(rng: Random) -> tuple[str, str]:
    """(question, answer in digits): a sum or a difference of numbers in words."""
    if rng.random() < 0.5:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        return f"What is {number_words(a)} plus {number_words(b)}?", str(a + b)
    a, b = rng.randint(40, 99), rng.randint(11, 39)
    return f"What is {number_words(a)} minus {number_words(b)}?", str(a - b)


@dataclass(frozen=True, slots=True)
class _Challenge:
    answer: str
    owner: str
    expires: float
    kind: str = "art"


@collaborators
class CaptchaBook:
    """Outstanding challenges: issue, then check once.

    ``owner`` is an opaque per-connection token (``ShtalkServerProtocol.conn_token``);
    an answer from any other connection is refused.  At most ``per_owner`` live
    challenges per connection and ``max_total`` overall (oldest evicted), so asking
    for challenges cannot exhaust memory.
    """

    clock: IReactorTime
    ttl: float = 120.0
    length: int = 5
    per_owner: int = 3
    max_total: int = 20000
    rng: Random = field(default_factory=secrets.SystemRandom)
    _live: OrderedDict[str, _Challenge] = field(default_factory=OrderedDict, init=False)
    issued: int = field(default=0, init=False)
    solved: int = field(default=0, init=False)

    def issue(self, owner: str, kind: str = "art") -> dict[str, Any]:
        """A new challenge for ``owner``: ``kind`` "art" (drawn) or "words" (a question)."""
        now = self.clock.seconds()
        self._expire(now)
        mine = [cid for cid, c in self._live.items() if c.owner == owner]
        for cid in mine[: max(0, len(mine) - self.per_owner + 1)]:
            del self._live[cid]
        while len(self._live) >= self.max_total:
            self._live.popitem(last=False)
        cid = "cap_" + secrets.token_urlsafe(12)
        self.issued += 1
        if kind == "words":
            question, answer = words_question(self.rng)
            self._live[cid] = _Challenge(answer, owner, now + self.ttl, kind)
            return {
                "id": cid,
                "kind": "words",
                "question": question,
                "expires_in": int(self.ttl),
                "hint": "answer in digits or in words",
            }
        answer = "".join(self.rng.choice(ALPHABET) for _ in range(self.length))
        self._live[cid] = _Challenge(answer, owner, now + self.ttl)
        return {
            "id": cid,
            "kind": "art",
            "art": render(answer, self.rng),
            "length": self.length,
            "alphabet": ALPHABET,
            "expires_in": int(self.ttl),
            "hint": alphabet_hint(self.length),
        }

    def kind_of(self, captcha: dict[str, Any] | None) -> str:
        """The kind of a live challenge named in an answer ("art" if unknown)."""
        challenge = self._live.get(str((captcha or {}).get("id", "")))
        return challenge.kind if challenge is not None else "art"

    def check(self, owner: str, captcha: dict[str, Any] | None) -> bool:
        """True once for the right answer from the owning connection before expiry."""
        if not captcha:
            return False
        challenge = self._live.pop(str(captcha.get("id", "")), None)
        if challenge is None:
            return False
        if challenge.owner != owner or challenge.expires <= self.clock.seconds():
            return False
        raw = str(captcha.get("answer", ""))
        if challenge.kind == "words":
            number = parse_number(raw)
            given = "" if number is None else str(number)
        else:
            given = normalise_answer(raw)
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
