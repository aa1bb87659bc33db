"""Start N calls at the same instant (a barrier) in threads: the shape of every race test."""
from __future__ import annotations

import threading


def race(n: int, call) -> list:
    """`call(i)` for i in 0..n-1, released together; their results in order. Any exception fails."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        try:
            barrier.wait()
            results[i] = call(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results
