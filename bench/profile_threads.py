"""cProfile of a Python command with every thread profiled, by CPU time, merged into one file.

    .venv/bin/python bench/profile_threads.py OUT.prof -m doit -n 4 deploy
    .venv/bin/python -c "import pstats; pstats.Stats('OUT.prof').sort_stats('cumtime').print_stats(40)"

`python -m cProfile` sees only the main thread, and `doit -n N` (par_type thread) runs the tasks,
the probes and paramiko's transports in other threads; py-spy is not installable here. Each thread
gets its own profiler timed by `time.thread_time` (CPU, not wall: a thread waiting on a device
costs nothing), started as the thread starts (`threading.setprofile`). Not a benchmark (no
bench_ prefix: bench/run.py does not run it).
"""
from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading
import time


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out, module = sys.argv[1], sys.argv[3]
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread_profiler(*_):
        profiler = cProfile.Profile(time.thread_time)
        with lock:
            profilers.append(profiler)
        profiler.enable()  # replaces this hook for the rest of the thread

    threading.setprofile(start_thread_profiler)
    sys.argv = [module, *sys.argv[4:]]
    main_profiler = cProfile.Profile(time.thread_time)
    code = 0
    main_profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        main_profiler.disable()
        stats = pstats.Stats(main_profiler)
        with lock:
            for profiler in profilers:
                profiler.create_stats()
                stats.add(profiler)
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
