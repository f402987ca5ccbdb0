"""moeviz: record, query and visualise Mixture-of-Experts routing.

`import moeviz` stays light: it never imports torch or streamlit (the collectors and the app do).
"""

from moeviz.schema import SCHEMA_VERSION
from moeviz.selection import Selection

__version__ = "0.1.0"
__all__ = ["SCHEMA_VERSION", "Selection", "__version__"]
