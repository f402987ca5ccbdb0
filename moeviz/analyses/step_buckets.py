"""Step buckets: curves over a long run's steps with at most ~1,500 points per line, their totals still exact.

A chart of 100,000 steps cannot show 100,000 points per line: the browser receives megabytes of figure JSON and
draws for seconds, and a screen is ~1,500 pixels wide anyway (TensorBoard downsamples its scalars, W&B samples
to ~1,500 points). Sampling steps would drop spikes and make a loss curve depend on which steps were kept, so
moeviz buckets instead: the analyses over steps (`expert_load`, `imbalance`, `switch_loss`, `pooled_switch_loss`,
`z_loss`) take `step_bucket=b` and group the exact per-step counts by `step // b`.

What a bucket's value is: the analysis computed over the bucket's steps pooled, i.e. from the summed counts
(assignments, router probability sums, tokens, z-loss sums) of those steps, never an average of per-step
ratios. So a bucket's Switch loss equals `switch_loss(con, sel.with_(steps=(lo, hi)), by_step=False)` for its
step range, and the counts of all buckets add up to the run's. The `step` column holds the bucket's first step
(a multiple of b); the bucket spans steps [step, step + b - 1].

The bucket is chosen from the span of steps a chart shows (`step_bucket_for`), among 1, 2, 5, 10, 20, 50, ...
so that a point reads "steps 2,000-2,049"; narrowing the step range gives finer buckets, down to every step.
"""

from __future__ import annotations

from moeviz.errors import MoevizError
from moeviz.store.rollups import block_start

__all__ = ["MAX_POINTS", "step_bucket_for", "bucket_count", "check_step_bucket", "bucketed_step_sql",
           "StepBucketError"]



class StepBucketError(MoevizError, ValueError):
    """A step bucket that is not a whole number of steps >= 1, or one asked of a result that is not over steps."""


MAX_POINTS = 1500  # points per line at most: about a screen's width in pixels, W&B's sample size


def step_bucket_for(first_step: int, last_step: int, max_points: int = MAX_POINTS) -> int:
    """The smallest bucket among 1, 2, 5, 10, 20, 50, ... that draws steps first..last in at most max_points
    points per line (buckets are aligned to multiples of the bucket, so the range may start mid-bucket)."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2; got {max_points}")
    first, last = int(first_step), int(last_step)
    if last - first + 1 <= max_points:
        return 1
    scale = 1
    while True:
        for m in (1, 2, 5):
            b = m * scale
            if bucket_count(first, last, b) <= max_points:
                return b
        scale *= 10


def bucket_count(first_step: int, last_step: int, step_bucket: int) -> int:
    """How many buckets of `step_bucket` steps (aligned to its multiples) the steps first..last fall into."""
    b = int(step_bucket)
    return int(last_step) // b - int(first_step) // b + 1


def check_step_bucket(step_bucket: int | None, by_step: bool) -> int | None:
    """The bucket as an int > 1, or None for every step (None and 1 mean the same); refuses nonsense early."""
    if step_bucket is None:
        return None
    if isinstance(step_bucket, bool) or int(step_bucket) != step_bucket or int(step_bucket) < 1:
        raise StepBucketError(f"step_bucket must be a whole number of steps >= 1 (None = every step); got {step_bucket!r}")
    if not by_step:
        raise StepBucketError("step_bucket groups steps over a curve: it needs by_step=True")
    return None if int(step_bucket) == 1 else int(step_bucket)


def bucketed_step_sql(column: str, step_bucket: int | None) -> str:
    """SQL for the bucket's first step of `column` (a step column), or the column itself without a bucket.

    The bucket is formatted into the SQL rather than bound: it is an int checked by `check_step_bucket` (no user
    text can reach it), and a literal lets DuckDB group by a constant expression."""
    if step_bucket is None:
        return column
    return f"CAST({block_start(column, int(step_bucket))} AS BIGINT)"  # floor, as the stored blocks
