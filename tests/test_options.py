"""Job options: one check, when they are made, for every shell that makes them."""

from __future__ import annotations

import pytest

from scr_nb.job.options import JobOptions, OptionError
from scr_nb.store.states import Mode


@pytest.mark.parametrize("fields, words", [
    ({"rate_limit": -1}, "--rate-limit must be"),
    ({"rate_limit": 0}, "--rate-limit must be"),
    ({"rate_limit": float("nan")}, "--rate-limit must be"),
    ({"concurrency": 0}, "--concurrency must be"),
    ({"concurrency": 2.5}, "--concurrency must be"),
    ({"ack_timeout": -5}, "--ack-timeout must be"),
    ({"dissent": "maybe"}, "--dissent must be"),
    ({"skip_acknowledged": True}, "--skip-acknowledged goes with Rerun"),
    ({"group": "  "}, "Patient Group name is blank"),
])
def test_options_no_job_can_run_with_are_refused_when_they_are_made(fields, words):
    with pytest.raises(OptionError, match=words):
        JobOptions(mode=Mode.RUN, **fields)
    assert JobOptions(mode=Mode.RERUN, skip_acknowledged=True, rate_limit=2.5).rate_limit == 2.5
