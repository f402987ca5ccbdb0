"""What part of a store an analysis looks at: runs, steps, layers, ranks, domains, tags.

Every analysis in moeviz takes a DuckDB connection that exposes the public schema (see `moeviz.store.schema`) and a
`Selection`; the selection turns into one parameterized SQL predicate, so no caller ever formats user values
into SQL text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable


@dataclass(frozen=True)
class Selection:
    run_ids: tuple[str, ...] | None = None  # None = every run in the store
    steps: tuple[int, int] | None = None  # inclusive [first, last]
    layers: tuple[int, ...] | None = None
    ranks: tuple[int, ...] | None = None
    domains: tuple[str, ...] | None = None  # needs sequences: applies to per-token tables only
    tags: tuple[str, ...] | None = None  # e.g. ('train',) or ('probe',); applies to per-token tables only

    def with_(self, **changes) -> "Selection":
        """A copy with some fields replaced (lists are turned into tuples)."""
        fixed = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()}
        return replace(self, **fixed)

    def where(self, alias: str = "", *, per_token: bool = False, seq_alias: str | None = None) -> tuple[str, list]:
        """SQL predicate and its parameters for a table aliased `alias`.

        `per_token` tables (routes, sequences) can also filter by domain and tag; they need the sequences table
        joined as `seq_alias` (or, for `sequences` itself, the same alias). Aggregate tables (step_stats,
        layer_stats) hold no domain: asking them for one raises, so callers fall back to routes knowingly.
        """
        p = f"{alias}." if alias else ""
        clauses: list[str] = []
        params: list = []

        def _in(col: str, values: Iterable) -> None:
            values = list(values)
            clauses.append(f"{col} IN ({', '.join('?' for _ in values)})" if values else "FALSE")
            params.extend(values)

        if self.run_ids is not None:
            _in(f"{p}run_id", self.run_ids)
        if self.steps is not None:
            clauses.append(f"{p}step BETWEEN ? AND ?")
            params.extend([int(self.steps[0]), int(self.steps[1])])
        if self.layers is not None:
            _in(f"{p}layer", [int(x) for x in self.layers])
        if self.ranks is not None:
            _in(f"{p}rank", [int(x) for x in self.ranks])
        if self.domains is not None or self.tags is not None:
            if not per_token:
                raise ValueError(
                    "domains/tags select sequences, which the per-step aggregates do not have; "
                    "compute this analysis from `routes` (per-token detail) instead"
                )
            s = f"{seq_alias or alias}." if (seq_alias or alias) else ""
            if self.domains is not None:
                _in(f"{s}domain", self.domains)
            if self.tags is not None:
                _in(f"{s}tag", self.tags)
        return (" AND ".join(clauses) or "TRUE"), params

    @property
    def needs_sequences(self) -> bool:
        return self.domains is not None or self.tags is not None
