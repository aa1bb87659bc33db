"""Gates a new release must pass on a device before it is switched on (used by rollouts).

Latency: the new release's smoke-test latency (median and p99, measured by the backend itself on
this device: ONNX Runtime's timed runs; trtexec's --exportTimes file, else its text summary, both
computed by trtexec's own rules; the smoke test's `latency_source` names which) against the previous release's,
measured the same way on the same device when it was staged. Accuracy is the smoke test itself:
outputs against the PyTorch reference, within the model's tolerances.
"""
from __future__ import annotations


def latency_regression(previous: dict | None, new: dict | None, limit: float) -> str | None:
    """Why `new` (a smoke test's latency_ms) is too slow against `previous`, or None if it is not
    (or either was not measured: a first release has nothing to compare with)."""
    if not previous or not new:
        return None
    for stat in ("median", "p99"):
        old, now = previous.get(stat), new.get(stat)
        if isinstance(old, (int, float)) and isinstance(now, (int, float)) and old > 0 and now > old * (1 + limit):
            return (f"{stat} latency {now:.3g} ms vs {old:.3g} ms for the previous release "
                    f"(+{(now / old - 1) * 100:.0f}%, allowed +{limit * 100:.0f}%)")
    return None
