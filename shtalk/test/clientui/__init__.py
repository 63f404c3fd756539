"""Unit tests of shtalk-urwid: model, view, controller, set-up forms."""
