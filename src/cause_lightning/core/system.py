"""What this process may use and where its sources come from: CPU cores per rank, the machine's
memory, the git commit."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

__all__ = ["cores_per_rank", "git_hash", "memory_bytes"]


def cores_per_rank(local_processes: int = 1) -> int:
    """CPU cores this process may use, shared fairly among the processes of one node.

    Counts the cores the process is allowed to run on (CPU affinity, which containers and job
    schedulers restrict), not the machine's total. A process that SLURM started as one task per
    rank (``SLURM_NTASKS_PER_NODE`` equal to ``local_processes``, e.g. ``+launcher=slurm``) owns
    the ``SLURM_CPUS_PER_TASK`` cores allocated to its task: they are not shared again.

    Args:
        local_processes: Processes of this run on the node (DDP ranks per node).

    Returns:
        At least 1.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        available = os.cpu_count() or 1
    local_processes = max(1, int(local_processes))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_task.isdigit() and tasks.isdigit() and int(tasks) == local_processes:
        return max(1, min(available, int(per_task)))
    return max(1, available // local_processes)


@functools.lru_cache(maxsize=1)
def memory_bytes() -> int | None:
    """The machine's physical memory in bytes (``None`` where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def git_hash() -> str | None:
    """Short commit hash of the installed sources, None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
