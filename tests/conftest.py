"""Shared test configuration: markers that skip what this machine cannot run, with the reason; the dashboard's
cached connections released after each test module."""

from __future__ import annotations

import gc
import os
import shutil
import sys

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests
        return False


def pytest_collection_modifyitems(config, items):
    chromium = os.environ.get("MOEVIZ_CHROMIUM", "/usr/bin/chromium")
    no_browser = pytest.mark.skip(reason=f"no Chromium at {chromium} (apt-get install -y chromium)")
    no_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    cuda = None
    for item in items:
        if "browser" in item.keywords and not (os.path.exists(chromium) or shutil.which("chromium")):
            item.add_marker(no_browser)
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _has_cuda()
            if not cuda:
                item.add_marker(no_gpu)


def pytest_configure(config):
    """One intra-op thread for torch: the tests' models are tiny, and on a 2-core machine that also runs
    other work, torch's default thread pool makes a 10 ms forward take seconds."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _release_cached_connections():
    """Close the store connections the dashboard cached (AppTest runs its pages in this process), so none
    outlives its test module's stores (DuckDB warns at exit). Only where a module used Streamlit."""
    yield
    st = sys.modules.get("streamlit")
    if st is not None:
        st.cache_resource.clear()
        st.cache_data.clear()
        gc.collect()
