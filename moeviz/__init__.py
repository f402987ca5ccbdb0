"""moeviz: record, query and visualise Mixture-of-Experts routing.

    moeviz/store/      Parquet segments, compaction into DuckDB, read-only views, users' SQL (no analysis)
    moeviz/analyses/   pure functions over a store's tables -> pandas DataFrames
    moeviz/charts.py   DataFrame -> Plotly figure
    moeviz/cli/        the `moeviz` command, a module per command
    moeviz/demo/       the demo: corpus, model, training and recording
    collectors/        (beside moeviz) the torch hooks that write a store; app/ the dashboard

`import moeviz` stays light: it never imports torch or streamlit (the collectors and the app do).
`from moeviz import load, capacity, ...` and the module paths from before the packages still work
(`moeviz._old_paths`).
"""

from moeviz import _old_paths
from moeviz.selection import Selection
from moeviz.store.schema import SCHEMA_VERSION

_old_paths.install()

__version__ = "0.1.0"
__all__ = ["SCHEMA_VERSION", "Selection", "__version__"]
