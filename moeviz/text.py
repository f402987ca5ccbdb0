"""Text for messages users read, shared by the collectors and the analyses (a leaf: it imports nothing of ours)."""

from __future__ import annotations

from typing import Iterable


def steps_text(steps: Iterable[int], most: int = 8) -> str:
    """'step 4', 'steps 4-9', 'steps 1, 3-5, 9': consecutive numbers as ranges, at most `most` parts."""
    ranges: list[list[int]] = []
    for x in sorted(set(steps)):
        if ranges and x == ranges[-1][1] + 1:
            ranges[-1][1] = x
        else:
            ranges.append([x, x])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    if len(parts) > most:
        parts = parts[: most - 1] + ["...", parts[-1]]
    one = len(ranges) == 1 and ranges[0][0] == ranges[0][1]
    return ("step " if one else "steps ") + ", ".join(parts)
