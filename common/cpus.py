"""How many CPU cores this process may use.

The affinity mask, not the machine's count: `taskset`, a container's cpuset or a scheduler
may give a hospital's node fewer cores than it has, and the simulation's Ray workers (one
per core given) and the image decoders size themselves by it. Children inherit the mask.
"""
import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1
