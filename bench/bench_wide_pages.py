"""Figure JSON per dashboard page on a wide model (58 MoE layers x 256 experts, top-8): what each page sends.

    python bench/bench_wide_pages.py [--store bench/out/wide] [--pages overview,load,...]

Builds the store if it is missing (bench/make_store.py: 58 layers, 256 experts, top-8, 2 x 64 tokens a step,
~712 K routes, flow counts between adjacent layers), then renders every page with Streamlit's AppTest (no
browser) and reports, per page, the Plotly charts it drew, the bytes of their figure JSON (what Streamlit sends
to the browser; a browser draws megabytes for seconds) and the page's wall time in AppTest. The browser side of
the same store is bench/bench_dashboard.py --store.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGES = ["overview", "load", "aux_loss", "capacity", "expert_parallel", "specialization", "tokens", "bounds", "toy",
         "compare"]
APP = str(ROOT / "app" / "main.py")


def build(store: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import make_store

    shape = make_store.Shape(layers=58, experts=256, top_k=8, batch=2, seq_len=64)
    r = make_store.generate(store, 712_704, shape, flow="adjacent", quiet=True)
    print(f"wrote {store}: {r['routes']:,} routes, {r['steps']} steps in {r['generate_write_s']:.1f} s", flush=True)


def page_figures(store: Path, page: str) -> dict:
    """Render one page with AppTest: charts, total figure JSON bytes, the largest chart's bytes, errors, seconds."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state["store_path"] = str(store)
    at.switch_page(f"views/{page}.py")
    t0 = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - t0
    sizes = [len(el.proto.spec) for el in at.get("plotly_chart")]
    return {"charts": len(sizes), "bytes": sum(sizes), "largest": max(sizes, default=0), "seconds": seconds,
            "errors": [str(e.value)[:120] for e in at.exception]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "bench" / "out" / "wide")
    ap.add_argument("--pages", default=",".join(PAGES))
    args = ap.parse_args()
    if not (args.store / "run.duckdb").exists():
        build(args.store)
    print("| page | charts | figure JSON | largest chart | AppTest s | exceptions |")
    print("|---|---:|---:|---:|---:|---|")
    for page in args.pages.split(","):
        m = page_figures(args.store, page)
        print(f"| {page} | {m['charts']} | {m['bytes'] / 1e6:.2f} MB | {m['largest'] / 1e6:.2f} MB | "
              f"{m['seconds']:.1f} | {'; '.join(m['errors']) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
