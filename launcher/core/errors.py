"""Errors a user can act on: each names where, what, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FtlError(Exception):
    """An error whose message is meant for the user as is (no traceback)."""


class RecipeError(FtlError):
    def __init__(self, file: str, field: str, value: object, fix: str):
        self.file, self.field, self.value, self.fix = file, field, value, fix
        where = f"{file}: " if file else ""
        shown = repr(value)
        if len(shown) > 200:  # a 100,000-character value makes no error line readable
            shown = shown[:200] + f"... ({len(shown):,} characters)"
        super().__init__(f"{where}{field} = {shown}: {fix}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[close[0]]!r}?" if close else ""
