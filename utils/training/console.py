"""Warnings and errors on the terminal: one line each, in colour when stderr is a terminal."""
import os
import sys

from termcolor import colored


class RunError(Exception):
    """A run cannot go on; the message is one line meant for the user."""


def _paint(text, color):
    """text in color when stderr is a terminal (and NO_COLOR is not set), plain otherwise."""
    tty = sys.stderr.isatty() and 'NO_COLOR' not in os.environ
    return colored(text, color, no_color=not tty, force_color=tty)


def warn(text, bar=None):
    """Print a warning on stderr, on a line of its own even while a progress bar is drawn on the terminal."""
    # The bar leaves the cursor at the end of its line; erase that line, the bar redraws itself below.
    clear = '\r\x1b[K' if bar is not None and bar.is_tty() else ''
    print(clear + _paint(text, 'yellow'), file=sys.stderr)


def error(prog, text):
    """Print `prog: error: text` on stderr, the text on one line."""
    print(_paint(f'{prog}: error: {" ".join(str(text).split())}', 'red'), file=sys.stderr)
