"""Parsing the arguments several commands share (`--steps A:B`, `--layers 0,3,5`), with one message per mistake."""

from __future__ import annotations

from moeviz.errors import MoevizError

OPEN_END = 2**62  # the step an open end of `A:` or `:B` stands for


class ArgumentError(MoevizError, ValueError):
    """A command-line argument is malformed (exit 2, one line)."""


def step_range(text: str | None, flag: str = "--steps", error: type[MoevizError] = ArgumentError
               ) -> tuple[int, int] | None:
    """'A:B' (inclusive), 'A:' or ':B' -> (first, last); 'A' -> (A, A); None -> None (every step)."""
    if text is None:
        return None
    first, sep, last = text.partition(":")
    try:
        if not sep:
            return int(text), int(text)
        return (int(first) if first.strip() else -OPEN_END, int(last) if last.strip() else OPEN_END)
    except ValueError:
        raise error(f"{flag} takes A:B (inclusive), A: or :B with integer steps; got {text!r}") from None


def int_list(text: str | None, flag: str, error: type[MoevizError] = ArgumentError) -> tuple[int, ...] | None:
    """'0,3,5' -> (0, 3, 5); None -> None (all)."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise error(f"{flag} takes comma-separated integers, e.g. 0,3,5; got {text!r}") from None


def int_at_least(text: str | None, flag: str, lowest: int, error: type[MoevizError] = ArgumentError) -> int | None:
    """An integer flag's value, refused below `lowest` ('gpus must be an integer >= 1': the analyses' own wording,
    so that a script sees one message for one mistake); None -> None (not given)."""
    if text is None:
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise error(f"{flag} takes an integer; got {text!r}") from None
    if value < lowest:
        raise error(f"{flag.lstrip('-')} must be an integer >= {lowest}; got {value}")
    return value
