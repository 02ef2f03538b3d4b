"""Tensor sharing with spawned processes (``trainer=ddp_spawn``).

``torch.multiprocessing`` passes CPU tensors to a spawned process as file descriptors of shared
memory by default. A tensor that lives only while its process object is pickled (the state of a
``torch.Generator``, any tensor built on the fly by a ``__reduce__``) is freed before the child
opens its descriptor, and on some systems the child then dies while unpickling its arguments with
``RuntimeError: unable to resize file <filename not specified> to the right size: Invalid argument``
and no message reaches the parent. The ``file_system`` strategy keeps such tensors alive through
torch's shared-memory manager. :func:`ensure_tensor_sharing` checks the default once, in a separate
interpreter, and switches to ``file_system`` (with one warning) when it fails that way.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import torch.multiprocessing as mp

from cause_lightning.core.logs import get_logger

__all__ = ["ensure_tensor_sharing", "FALLBACK_STRATEGY", "SHARING_FAILURE"]

log = get_logger(__name__)

FALLBACK_STRATEGY = "file_system"
# What torch reports when a child cannot map a tensor it was handed by file descriptor.
SHARING_FAILURE = "unable to resize file"

# Spawns one child whose only argument holds a temporary tensor (a generator's state), the case
# that fails; the child does nothing else.
_PROBE = """
import sys
import torch
import torch.multiprocessing as mp
from cause_lightning.stages.sharing import _receive

if __name__ == "__main__":
    mp.set_sharing_strategy(sys.argv[1])
    child = mp.get_context("spawn").Process(
        target=_receive, args=(torch.Generator().manual_seed(0),)
    )
    child.start()
    child.join()
    sys.exit(child.exitcode)
"""


def _receive(_: object) -> None:
    """Target of the probe's child: reaching it means the argument was unpickled."""


def sharing_works(strategy: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Whether a spawned process can receive a temporary tensor under a sharing strategy.

    Args:
        strategy: A ``torch.multiprocessing`` sharing strategy.
        timeout: Seconds allowed for the probe (two interpreter starts).

    Returns:
        ``(works, stderr of the probe)``.
    """
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, strategy],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode == 0, done.stderr


@functools.lru_cache(maxsize=1)
def ensure_tensor_sharing() -> str:
    """Switch to the ``file_system`` sharing strategy when the default fails (once per process).

    Returns:
        The sharing strategy in use afterwards.
    """
    current = mp.get_sharing_strategy()
    if current == FALLBACK_STRATEGY or FALLBACK_STRATEGY not in mp.get_all_sharing_strategies():
        return current
    try:
        works, stderr = sharing_works(current)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("tensor-sharing probe did not run: %s", err)
        return current
    if works:
        return current
    if SHARING_FAILURE not in stderr:
        log.debug("tensor-sharing probe failed for another reason:\n%s", stderr[-2000:])
        return current
    mp.set_sharing_strategy(FALLBACK_STRATEGY)
    log.warning(
        "torch could not hand a tensor to a spawned process with the %r sharing strategy "
        "(%s ... Invalid argument); using %r instead for this run",
        current,
        SHARING_FAILURE,
        FALLBACK_STRATEGY,
    )
    return FALLBACK_STRATEGY
