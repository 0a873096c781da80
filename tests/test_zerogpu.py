"""ZeroGPU's rules as the app applies them (deblurdiff.space.zerogpu, deblurdiff.pipeline.estimates):
the booked duration and spaces' factor, the configurable cap, quota refusals. The whole
path through the real spaces package is rehearsed in test_zerogpu_rehearsal.py."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from deblurdiff.pipeline import estimates
from deblurdiff.pipeline.estimates import SpeedModel


def test_gpu_cap_is_configurable(monkeypatch):
    assert estimates.gpu_cap_seconds() == estimates.DEFAULT_GPU_CAP_SECONDS == 40 * 60
    monkeypatch.setenv(estimates.GPU_CAP_ENV, "600")
    assert estimates.gpu_cap_seconds() == 600
    monkeypatch.setenv(estimates.GPU_CAP_ENV, "ten minutes")
    assert estimates.gpu_cap_seconds() == estimates.DEFAULT_GPU_CAP_SECONDS


def test_zerogpu_requests_the_booking_divided_by_spaces_factor(monkeypatch):
    """On an RTX Pro 6000 node spaces multiplies requests by its configs.json factor."""
    from spaces.zero import client, config

    from deblurdiff.space import zerogpu

    rtx = next(c for c in json.loads((Path(config.__file__).parent / config.CONFIGS_FILENAME).read_text()) if c["duration_factor"] != 1)
    monkeypatch.setattr(config, "get_config", lambda: rtx)
    assert zerogpu.duration_factor() == rtx["duration_factor"]
    for booking in (20, 97, 1500, 2400):
        requested = zerogpu.request_seconds(booking)
        booked = round(client.get_duration_seconds(timedelta(seconds=requested), None))
        assert booked <= booking < round(client.get_duration_seconds(timedelta(seconds=requested + 1), None))
    assert zerogpu.booked_seconds(zerogpu.startup_request_seconds()) == zerogpu.STARTUP_MAX_BOOKED_SECONDS
    assert zerogpu.request_seconds(zerogpu.DAILY_QUOTA_SECONDS["with PRO"], "xlarge") == 2400  # xlarge: no factor


def test_zerogpu_quota_refusal_says_what_fits():
    from deblurdiff.space import zerogpu

    speed = SpeedModel.default("cuda")
    message = "You have exceeded your ZeroGPU quota (123s requested vs. 100s left). Try again in 1:00:00."
    text = zerogpu.quota_refusal(message, speed, 2048, 2048, 50)
    assert "100 s of GPU quota you have left today" in text and "at most" in text and "signing in" in text
    assert zerogpu.quota_refusal("Space app has reached its GPU limit.", speed, 64, 64, 1).endswith("gives more.")
    assert zerogpu.quota_refusal("GPU task aborted", speed, 64, 64, 1) is None
