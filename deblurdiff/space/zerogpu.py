"""ZeroGPU's rules as ``spaces`` applies them. ``spaces`` multiplies the duration given to
``@spaces.GPU`` by its node's ``duration_factor`` (1.5 on RTX Pro 6000) before booking it, so the
app works in booked seconds (what the visitor's quota is charged) and asks for the booking divided
by that factor (:func:`request_seconds`)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from ..pipeline.estimates import SpeedModel, format_seconds, format_steps, gpu_booking_seconds, gpu_limit_advice

#: Seconds one call may book while the Space starts: ``@spaces.GPU(duration=1500)`` is
#: "the maximum duration allowed during startup" (Hugging Face, "Make your ZeroGPU Spaces
#: go brrr with ahead-of-time compilation", September 2025). ``spaces`` has no such check
#: of its own, so the request is this divided by the factor :func:`duration_factor`.
STARTUP_MAX_BOOKED_SECONDS = 1500

#: Visitors' daily ZeroGPU quota in seconds (Hugging Face docs, "Spaces ZeroGPU", July
#: 2026). ZeroGPU refuses a call that books more than the visitor has left.
DAILY_QUOTA_SECONDS = {"without an account": 120, "with a free account": 300, "with PRO": 2400}

#: Requests served at once on ZeroGPU: each call has its own GPU slice, and ZeroGPU itself
#: makes the extra ones wait for a slot ("Waiting for a GPU slot on this Space").
CONCURRENCY = 8


def quota_note() -> str:
    """What a refusal adds: signing in gives more quota."""
    tiers = ", ".join(f"{seconds // 60} min {tier}" for tier, seconds in DAILY_QUOTA_SECONDS.items())
    return f"ZeroGPU's daily GPU quota per visitor is {tiers}: signing in to Hugging Face gives more."


def _booked(requested: float, gpu_size: str | None) -> float:
    """What ``spaces`` books for a request of ``requested`` seconds (the request, if unreadable)."""
    try:
        from spaces.zero import client

        return float(client.get_duration_seconds(timedelta(seconds=requested), gpu_size))
    except Exception:  # pragma: no cover - an unexpected `spaces` version
        return float(requested)


def duration_factor(gpu_size: str | None = None) -> float:
    """What ``spaces`` multiplies a requested duration by on this node."""
    return _booked(1, gpu_size)


def booked_seconds(requested: int, gpu_size: str | None = None) -> int:
    """Seconds ``spaces`` books for ``@spaces.GPU(duration=requested)``, as sent to ``/schedule``."""
    return round(_booked(int(requested), gpu_size))


def request_seconds(booking: float, gpu_size: str | None = None) -> int:
    """The largest duration to give ``@spaces.GPU`` so that ``spaces`` books at most ``booking`` seconds."""
    requested = max(1, math.floor(booking / duration_factor(gpu_size)))
    while requested > 1 and booked_seconds(requested, gpu_size) > booking:
        requested -= 1
    return requested


def startup_request_seconds() -> int:
    """Duration for the start-up call (the ahead-of-time compile): all ZeroGPU allows then."""
    return request_seconds(STARTUP_MAX_BOOKED_SECONDS)


def duration_for(estimate: float) -> int:
    """The duration to give ``@spaces.GPU`` for a run estimated at ``estimate`` seconds."""
    return request_seconds(gpu_booking_seconds(estimate))


def booked_for(estimate: float) -> int:
    """The seconds ZeroGPU will book (and charge) for that run."""
    return booked_seconds(duration_for(estimate))


def limit_advice(speed: SpeedModel, width: int, height: int, steps: int, guidance_scale: float = 1.0,
                 tiled: bool | None = None, *, left: int | None = None) -> str | None:
    """None when the run's booking fits the cap (or, with ``left``, the visitor's quota
    left today); otherwise what fits, and that signing in gives more quota."""
    what = None if left is None else f"the {left} s of GPU quota you have left today"
    return gpu_limit_advice(speed, width, height, steps, guidance_scale, tiled, limit=left, booked=booked_for,
                            what=what, note=quota_note())


def estimate_text(speed: SpeedModel, width: int, height: int, steps: int, guidance_scale: float = 1.0,
                  tiled: bool | None = None) -> str:
    """The GPU time, what it books of the visitor's quota, and a warning when it cannot fit."""
    seconds = speed.seconds(width, height, steps, guidance_scale, tiled)
    booked = booked_for(seconds)
    text = (
        f"Estimated GPU time: **about {format_seconds(seconds)}** for {format_steps(steps)}, "
        f"plus waiting for a GPU (an estimate; {format_seconds(booked)} of your daily GPU quota is reserved for it)."
    )
    advice = limit_advice(speed, width, height, steps, guidance_scale, tiled)
    if advice:
        return f"{text} ⚠️ {advice}"
    if booked > min(DAILY_QUOTA_SECONDS.values()):
        return f"{text} ⚠️ More than some visitors have: {quota_note()}"
    return text


#: ``spaces``' message when a booking is above the visitor's quota left ("... quota (300s requested vs. 100s left) ...").
_QUOTA_LEFT = re.compile(r"\((\d+)s requested vs\. (\d+)s left\)")


def quota_refusal(message: str, speed: SpeedModel, width: int, height: int, steps: int,
                  guidance_scale: float = 1.0, tiled: bool | None = None) -> str | None:
    """What fits in the quota left, for ``spaces``' refusal ``message``; None for another error."""
    found = _QUOTA_LEFT.search(message)
    if found is not None:
        left = int(found.group(2))
        return limit_advice(speed, width, height, steps, guidance_scale, tiled, left=left) or (
            f"ZeroGPU refused this run: it has {left} s of your GPU quota left today. {quota_note()}"
        )
    if "quota" in message.lower() or "GPU limit" in message or "maximum allowed" in message:
        return f"ZeroGPU refused this run: {message.strip()} {quota_note()}"
    return None
