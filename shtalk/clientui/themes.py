"""Colour themes: 16-colour ones work on every terminal, 256-colour ones where supported.

A palette entry is urwid's ``(name, fg, bg, mono, fg_high, bg_high)``; the 256-colour
themes fill the ``high`` colours and ask the screen for 256 colours.
"""

from __future__ import annotations

from dataclasses import dataclass

PaletteEntry = tuple[str, str, str, str, str, str]

# Attribute names the widgets use (the unit tests check every theme defines them all).
ATTRS = (
    "header", "status", "status_good", "status_warn", "status_bad", "conv", "conv_focus",
    "conv_unread", "conv_mention", "time", "me", "sender", "body", "mention", "info", "error",
    "state_sending", "state_ok", "state_failed", "timer", "verified", "unverified", "changed",
    "input", "prompt", "help_key", "help_cat", "dialog", "dialog_title", "progress_todo",
    "progress_done", "online", "offline",
)


@dataclass(frozen=True)
class Theme:
    name: str
    colors: int  # 16 or 256
    palette: tuple[PaletteEntry, ...]


def _p(name: str, fg: str, bg: str, mono: str = "", fg_high: str = "",
       bg_high: str = "") -> PaletteEntry:
    return (name, fg, bg, mono, fg_high, bg_high)


_DARK16 = (
    _p("header", "white,bold", "dark blue", "bold"),
    _p("status", "white", "dark blue", "standout"),
    _p("status_good", "light green,bold", "dark blue", "bold"),
    _p("status_warn", "yellow,bold", "dark blue", "bold"),
    _p("status_bad", "white,bold", "dark red", "standout"),
    _p("conv", "light gray", "black"),
    _p("conv_focus", "black", "light gray", "standout"),
    _p("conv_unread", "white,bold", "black", "bold"),
    _p("conv_mention", "yellow,bold", "black", "bold"),
    _p("time", "dark gray", "black"),
    _p("me", "light cyan,bold", "black", "bold"),
    _p("sender", "light green,bold", "black", "bold"),
    _p("body", "light gray", "black"),
    _p("mention", "yellow,bold", "black", "bold"),
    _p("info", "dark cyan", "black"),
    _p("error", "light red,bold", "black", "bold"),
    _p("state_sending", "dark gray", "black"),
    _p("state_ok", "dark green", "black"),
    _p("state_failed", "light red,bold", "black", "bold"),
    _p("timer", "brown", "black"),
    _p("verified", "light green", "black"),
    _p("unverified", "brown", "black"),
    _p("changed", "light red,bold", "black", "bold"),
    _p("input", "white", "black"),
    _p("prompt", "light cyan,bold", "black", "bold"),
    _p("help_key", "yellow,bold", "black", "bold"),
    _p("help_cat", "light cyan,bold,underline", "black", "bold,underline"),
    _p("dialog", "light gray", "black"),
    _p("dialog_title", "white,bold", "dark blue", "bold"),
    _p("progress_todo", "light gray", "dark gray"),
    _p("progress_done", "black", "light cyan", "standout"),
    _p("online", "light green,bold", "black", "bold"),
    _p("offline", "dark gray", "black"),
)

_LIGHT16 = tuple(
    _p(name, fg.replace("light gray", "black").replace("white", "black"),
       "white" if bg == "black" else bg, mono)
    if bg == "black" else (name, fg, bg, mono, fh, bh)
    for (name, fg, bg, mono, fh, bh) in _DARK16
)


def _high(base: tuple[PaletteEntry, ...], high: dict[str, tuple[str, str]]) -> tuple[
        PaletteEntry, ...]:
    out = []
    for name, fg, bg, mono, _, _ in base:
        fh, bh = high.get(name, ("", ""))
        out.append((name, fg, bg, mono, fh or "h250", bh or "g11"))
    return tuple(out)


_DARK256 = _high(_DARK16, {
    "header": ("h255,bold", "h24"), "status": ("h252", "h237"),
    "status_good": ("h114,bold", "h237"), "status_warn": ("h221,bold", "h237"),
    "status_bad": ("h255,bold", "h124"), "conv": ("h250", "h235"),
    "conv_focus": ("h255,bold", "h24"), "conv_unread": ("h255,bold", "h235"),
    "conv_mention": ("h221,bold", "h235"), "time": ("h242", "g11"), "me": ("h117,bold", "g11"),
    "sender": ("h150,bold", "g11"), "body": ("h252", "g11"), "mention": ("h221,bold", "g11"),
    "info": ("h73", "g11"), "error": ("h203,bold", "g11"), "state_sending": ("h242", "g11"),
    "state_ok": ("h71", "g11"), "state_failed": ("h203,bold", "g11"), "timer": ("h179", "g11"),
    "verified": ("h114", "g11"), "unverified": ("h179", "g11"), "changed": ("h203,bold", "g11"),
    "input": ("h255", "g11"), "prompt": ("h117,bold", "g11"), "help_key": ("h221,bold", "g11"),
    "help_cat": ("h117,bold,underline", "g11"), "dialog": ("h252", "h236"),
    "dialog_title": ("h255,bold", "h24"), "progress_todo": ("h250", "h238"),
    "progress_done": ("h16", "h117"), "online": ("h114,bold", "h235"),
    "offline": ("h242", "h235"),
})

THEMES: dict[str, Theme] = {
    "dark256": Theme("dark256", 256, _DARK256),
    "dark16": Theme("dark16", 16, _DARK16),
    "light16": Theme("light16", 16, _LIGHT16),
    "mono": Theme("mono", 1, tuple((n, "default", "default", m, "", "") for
                                   (n, _, _, m, _, _) in _DARK16)),
}
