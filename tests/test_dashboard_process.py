"""moeviz.cli.dashboard_process: a dashboard that cannot start says why (the server's own message), not a timeout."""

from __future__ import annotations

import pytest

from moeviz.cli.dashboard_process import serving


def test_a_missing_store_fails_fast_with_the_clis_message(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with \d+: .*no run folder or folder of runs"):
        with serving(tmp_path / "missing", timeout_s=60):
            pytest.fail("the dashboard must not come up on a path that does not exist")
