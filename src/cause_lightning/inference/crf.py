"""DenseCRF post-processing of cluster / linear logits (docs/method.md §7.3).

STEGO's parameters: unary = ``-log softmax(logits)`` (``pydensecrf.utils.unary_from_softmax``
with its default clipping), Gaussian pairwise ``sxy=1, compat=3``, bilateral pairwise ``sxy=67,
srgb=3, compat=4``, 10 mean-field iterations, on the de-normalised uint8 image (H x W x 3,
C-contiguous).

``pydensecrf`` (PyPI package ``pydensecrf2``, extra ``cause-lightning[crf]``) is optional and
imported lazily. :class:`CRFRunner` runs images serially or in a process pool with a timeout
(reference defect #8 of method.md §11: the reference blocks on a 40-process pool); its
:meth:`~CRFRunner.submit` / :meth:`~CRFRunner.collect` pair lets the evaluation keep the
accelerator busy with the next batches while the pool works, and returns label maps rather than
probabilities when only the argmax is needed.

The pairwise terms depend on the picture only, so :func:`dense_crfs` builds them (two
permutohedral lattices, the costly part of a CRF's set-up) once per image and runs mean-field
inference for each of the image's score maps: the evaluation refines ``crf``, ``flip_crf`` and the
linear probe's ``crf`` of one image on one lattice, with results identical to separate calls.

This module imports only numpy at import time, so pool workers start without loading torch.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cause_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD
from cause_lightning.core.logs import get_logger

if TYPE_CHECKING:
    import torch

__all__ = [
    "CRF_PARAMS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CRFRunner",
    "crf_available",
    "default_crf_workers",
    "stage_crf_runner",
    "dense_crf",
    "dense_crfs",
    "denormalize_to_uint8",
]

log = get_logger(__name__)

CRF_PARAMS: dict[str, float] = {
    "gaussian_sxy": 1.0,
    "gaussian_compat": 3.0,
    "bilateral_sxy": 67.0,
    "bilateral_srgb": 3.0,
    "bilateral_compat": 4.0,
}

_INSTALL_HINT = (
    "DenseCRF needs the optional package pydensecrf2 (import name pydensecrf): "
    'pip install "cause-lightning[crf]"  (or: pip install pydensecrf2). '
    "Or evaluate without CRF (variants raw / flip)."
)


_BROKEN_POOL = (
    "a CRF worker process died (out of memory, a crash in pydensecrf, or killed); the pool was "
    "shut down and will be restarted on the next call."
)


def _import_pydensecrf() -> tuple[Any, Any]:
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as crf_utils
    except ImportError as err:
        raise RuntimeError(f"{_INSTALL_HINT} (import failed: {err})") from err
    return dcrf, crf_utils


def crf_available() -> bool:
    """Whether ``pydensecrf`` can be imported.

    Returns:
        True when DenseCRF post-processing can run.
    """
    try:
        _import_pydensecrf()
    except RuntimeError:
        return False
    return True


def _as_numpy(array: Any, name: str) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing torch
        return array.detach().cpu().float().numpy()
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(array).__name__}.")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)  # C H W, for numerical stability
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=0, keepdims=True)
    return shifted


def _resize_bilinear(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(
        torch.from_numpy(logits)[None], size=size, mode="bilinear", align_corners=False
    )  # 1 C H W
    return resized[0].numpy()


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a numpy uint8 array [H, W, 3], got {type(image).__name__}; "
            "use denormalize_to_uint8(image_tensor) for a normalised [3, H, W] tensor."
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}; "
            "use denormalize_to_uint8(image_tensor) for a normalised [3, H, W] tensor."
        )
    return np.ascontiguousarray(image)


def _check_logits(logits: Any) -> np.ndarray:
    array = _as_numpy(logits, "logits")
    if array.ndim != 3 or array.shape[0] < 1:
        raise ValueError(f"logits must be [C, H, W], got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"logits must be floating point, got {array.dtype}.")
    return array


def _check_maps(logits: Any) -> list[np.ndarray]:
    """Several ``[C, H, W]`` score maps of one image, at least one, all with the same ``C``."""
    maps = [_check_logits(lg) for lg in logits]
    if not maps:
        raise ValueError("no score map given for an image; pass at least one [C, H, W] map.")
    classes = sorted({m.shape[0] for m in maps})
    if len(classes) > 1:
        raise ValueError(
            f"the score maps of one image must share their class count, got C in {classes}; "
            "refine maps of different class counts in separate calls."
        )
    return maps


def dense_crf(
    image: np.ndarray,
    logits: np.ndarray | torch.Tensor,
    iterations: int = 10,
    channel_order: Literal["rgb", "bgr"] = "rgb",
) -> np.ndarray:
    """Refine per-pixel class scores with a fully connected CRF (STEGO parameters).

    The library always receives the image in BGR order, as in the reference. The exact bilateral
    kernel does not depend on the channel order, but pydensecrf's permutohedral-lattice
    approximation does (about 0.4% of argmax pixels change on a natural 320x320 image), so the
    order is fixed to reproduce the reference.

    Args:
        image: uint8 ``[H, W, 3]`` image, e.g. from :func:`denormalize_to_uint8`.
        logits: ``[C, H, W]`` scores (log-probabilities or unnormalised), numpy or torch; softmax is
            applied over ``C``. A different spatial size is upsampled bilinearly to the image size.
        iterations: mean-field iterations (0 returns the clipped, renormalised unary distribution).
        channel_order: channel order of ``image``: ``"rgb"`` (default) or ``"bgr"``.

    Returns:
        float32 ``[C, H, W]`` probabilities (each pixel sums to 1).

    Raises:
        RuntimeError: if ``pydensecrf`` is not installed (names the install command).
        TypeError: if an input has the wrong type or dtype.
        ValueError: if an input has the wrong shape or value.
    """
    return dense_crfs(image, [logits], iterations, channel_order)[0]


def dense_crfs(
    image: np.ndarray,
    logits: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    iterations: int = 10,
    channel_order: Literal["rgb", "bgr"] = "rgb",
) -> list[np.ndarray]:
    """:func:`dense_crf` of several score maps of one image, on one set of pairwise terms.

    The Gaussian and bilateral terms (pydensecrf's permutohedral lattices) depend on the picture
    only; they are built once and each map gets its own mean-field inference. pydensecrf's
    inference starts from the unary set last and leaves the pairwise terms unchanged, so every
    result equals the :func:`dense_crf` call of its map.

    Args:
        image: uint8 ``[H, W, 3]`` image, e.g. from :func:`denormalize_to_uint8`.
        logits: ``U`` score maps ``[C, H, W]`` (a sequence, or one ``[U, C, H, W]`` array or
            tensor), all with the same ``C``; each as in :func:`dense_crf`.
        iterations: mean-field iterations.
        channel_order: channel order of ``image``: ``"rgb"`` (default) or ``"bgr"``.

    Returns:
        ``U`` float32 ``[C, H, W]`` probability maps, in input order.

    Raises:
        RuntimeError: if ``pydensecrf`` is not installed (names the install command).
        TypeError: if an input has the wrong type or dtype.
        ValueError: if an input has the wrong shape or value, no map is given, or the maps differ
            in class count.
    """
    dcrf, crf_utils = _import_pydensecrf()
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}.")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
    image = _check_image(image)
    maps = _check_maps(logits)
    bgr = np.ascontiguousarray(image[..., ::-1]) if channel_order == "rgb" else image  # H W 3
    height, width = image.shape[:2]
    num_classes = maps[0].shape[0]

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.addPairwiseGaussian(sxy=CRF_PARAMS["gaussian_sxy"], compat=CRF_PARAMS["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=CRF_PARAMS["bilateral_sxy"],
        srgb=CRF_PARAMS["bilateral_srgb"],
        rgbim=bgr,
        compat=CRF_PARAMS["bilateral_compat"],
    )
    results = []
    for scores in maps:
        scores = scores.astype(np.float32)  # copy: softmax works in place
        if scores.shape[1:] != (height, width):
            scores = _resize_bilinear(scores, (height, width))
        probs = _softmax(scores)  # C H W
        crf.setUnaryEnergy(np.ascontiguousarray(crf_utils.unary_from_softmax(probs)))  # C (H*W)
        q = crf.inference(int(iterations))
        results.append(np.asarray(q, dtype=np.float32).reshape(num_classes, height, width))
    return results


def denormalize_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Undo ImageNet normalisation for the CRF's bilateral kernel (docs/method.md §7.3).

    ``x * std + mean``, times 255, clamped to [0, 255] and truncated to uint8 (the reference
    truncates too, so a round trip can be one level below the original pixel).

    Args:
        image: normalised ``[3, H, W]`` tensor or array.

    Returns:
        C-contiguous uint8 ``[H, W, 3]`` array.

    Raises:
        ValueError: if ``image`` is not ``[3, H, W]``.
    """
    array = _as_numpy(image, "image").astype(np.float32)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(
            f"expected one normalised image [3, H, W], got shape {array.shape}; "
            "index the batch (images[i]) first."
        )
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    pixels = np.clip((array * std + mean) * 255.0, 0.0, 255.0).astype(np.uint8)  # 3 H W, truncates
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


def _check_image_maps(entry: Any) -> tuple[list[np.ndarray], bool]:
    """One image's score maps as a list, and whether the entry was a single ``[C, H, W]`` map."""
    if isinstance(entry, (list, tuple)):
        return _check_maps(entry), False
    array = _as_numpy(entry, "logits")
    if array.ndim == 4:
        return _check_maps(array), False
    return [_check_logits(array)], True


def _crf_task(
    image: np.ndarray,
    maps: list[np.ndarray],
    single: bool,
    iterations: int,
    channel_order: Literal["rgb", "bgr"],
    argmax: bool = False,
) -> np.ndarray:
    probabilities = dense_crfs(image, maps, iterations, channel_order)  # U x [C H W]
    if argmax:
        # A label map is C times smaller than the probabilities: only it crosses back to the parent.
        dtype = np.uint8 if probabilities[0].shape[0] <= 256 else np.int64
        probabilities = [p.argmax(0).astype(dtype) for p in probabilities]
    return probabilities[0] if single else np.stack(probabilities)


def _default_start_method() -> str:
    # Never fork a parent that holds torch threads. forkserver forks workers from a clean server
    # (a little cheaper than spawn's fresh interpreter); Windows only has spawn.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class CRFRunner:
    """Apply :func:`dense_crf` to a batch of images, serially or in a small reusable process pool.

    With ``num_workers > 0`` the pool is created on first use and reused across calls. If a batch
    is not finished ``timeout`` seconds after the caller starts waiting for it (:meth:`collect`),
    the pending work is cancelled, the workers are terminated (never waited on), and
    :class:`TimeoutError` is raised; the next call starts a fresh pool. The serial path cannot be
    interrupted and ignores ``timeout``.

    The first pooled call also pays worker start-up: about 0.3 s, plus, when the parent was
    started from a script path (not ``python -m ...``), the time each worker needs to re-import
    that script's top-level imports (multiprocessing does this for spawn and forkserver alike).
    The timeout covers that start-up, so keep it generous.

    Args:
        num_workers: 0 for in-process execution, otherwise the number of worker processes.
        timeout: seconds a caller waits for one batch in pool mode.
        iterations: mean-field iterations per image.
        start_method: multiprocessing start method (default ``forkserver`` where available, else
            ``spawn``; ``fork`` is refused because the parent usually holds torch threads).
        channel_order: channel order of the images (see :func:`dense_crf`).

    Raises:
        ValueError: on a negative worker count, a non-positive timeout or ``start_method="fork"``.
    """

    def __init__(
        self,
        num_workers: int = 0,
        timeout: float = 120.0,
        iterations: int = 10,
        start_method: str | None = None,
        channel_order: Literal["rgb", "bgr"] = "rgb",
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}.")
        method = start_method or _default_start_method()
        if method == "fork":
            raise ValueError(
                "start_method='fork' can deadlock in a process that holds torch threads; "
                "use 'forkserver' or 'spawn'."
            )
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.iterations = iterations
        self.start_method = method
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}.")
        self.channel_order = channel_order
        self._executor: cf.ProcessPoolExecutor | None = None

    def __call__(
        self,
        images: Sequence[np.ndarray],
        logits: Sequence[Any],
        argmax: bool = False,
    ) -> list[np.ndarray]:
        """Run the CRF on each image with its score map(s) and wait for the results.

        Args:
            images: uint8 ``[H, W, 3]`` arrays.
            logits: Per image, one ``[C, H, W]`` score map (numpy or torch), or several: a
                sequence of ``[C, H, W]`` maps or one ``[U, C, H, W]`` array, refined on the
                image's one set of pairwise terms (:func:`dense_crfs`).
            argmax: Return label maps ``[H, W]`` (uint8 up to 256 classes, else int64) instead of
                probabilities.

        Returns:
            Per image, in input order: float32 ``[C, H, W]`` probabilities (or ``[H, W]`` labels)
            for a single map, ``[U, C, H, W]`` (or ``[U, H, W]``) for several.

        Raises:
            ValueError: if the two lists differ in length.
            TimeoutError: if a pooled batch exceeds ``timeout`` (the pool is then shut down).
            RuntimeError: if ``pydensecrf`` is missing or a worker process died.
        """
        return self.collect(self.submit(images, logits, argmax=argmax))

    def submit(
        self,
        images: Sequence[np.ndarray],
        logits: Sequence[Any],
        argmax: bool = False,
    ) -> list[cf.Future]:
        """Start the CRF of each image with its score map(s) and return without waiting.

        With a pool the work runs in the workers while the caller goes on (e.g. with the next
        batch on the accelerator); without one it runs here, before this returns. Each image
        crosses to a worker once, with all its maps.

        Args:
            images: uint8 ``[H, W, 3]`` arrays.
            logits: Per image, one score map or several (see :meth:`__call__`).
            argmax: Return label maps instead of probabilities (see :meth:`__call__`).

        Returns:
            One future per image; pass the list to :meth:`collect`.

        Raises:
            ValueError: if the two lists differ in length.
            RuntimeError: if ``pydensecrf`` is missing or the pool is broken.
        """
        if len(images) != len(logits):
            raise ValueError(f"got {len(images)} images but {len(logits)} logit maps.")
        _import_pydensecrf()  # fail fast in the parent with the install hint
        # Validate (and move off the GPU) in the parent so errors name the caller's problem.
        tasks = [(_check_image(im), *_check_image_maps(lg)) for im, lg in zip(images, logits)]
        settings = (self.iterations, self.channel_order, argmax)
        if self.num_workers == 0:
            futures = []
            for task in tasks:
                future: cf.Future = cf.Future()
                future.set_result(_crf_task(*task, *settings))
                futures.append(future)
            return futures
        executor = self._pool()
        try:
            return [executor.submit(_crf_task, *task, *settings) for task in tasks]
        except cf.process.BrokenProcessPool as err:
            self._kill_pool()
            raise RuntimeError(_BROKEN_POOL) from err

    def collect(self, futures: Sequence[cf.Future]) -> list[np.ndarray]:
        """Wait for futures of :meth:`submit` (at most ``timeout`` seconds from this call).

        Args:
            futures: Futures returned by :meth:`submit`.

        Returns:
            Their results, in order.

        Raises:
            TimeoutError: if they are not all done within ``timeout`` (the pool is shut down).
            RuntimeError: if a worker process died (the pool is shut down).
        """
        start = time.monotonic()
        try:
            done, pending = cf.wait(futures, timeout=self.timeout, return_when=cf.FIRST_EXCEPTION)
        except BaseException:
            # e.g. KeyboardInterrupt while waiting: never leave busy workers behind
            self._kill_pool()
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            err = failed[0].exception()
            if isinstance(err, cf.process.BrokenProcessPool):
                self._kill_pool()
                raise RuntimeError(_BROKEN_POOL) from err
            raise err  # an ordinary error inside dense_crf; the pool itself is healthy
        if pending:
            self._kill_pool()
            raise TimeoutError(
                f"DenseCRF on {len(futures)} images did not finish within {self.timeout:.1f} s "
                f"({len(pending)} unfinished; elapsed {time.monotonic() - start:.1f} s). The "
                "worker pool was terminated. Raise the timeout (method.eval.crf_timeout), lower "
                "the batch size, or use more workers."
            )
        return [f.result() for f in futures]

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context(self.start_method)
            self._executor = cf.ProcessPoolExecutor(self.num_workers, mp_context=context)
        return self._executor

    def _kill_pool(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # terminate_workers() exists from Python 3.14; before that the worker table is private.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 2.0
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=1.0)
        log.warning("CRF worker pool terminated (%d processes).", len(processes))

    def close(self) -> None:
        """Shut the worker pool down (waits for running work; idempotent)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CRFRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._kill_pool()  # do not wait on possibly stuck workers while an error propagates
        else:
            self.close()

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            try:
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception:  # noqa: BLE001 - interpreter may be shutting down
                pass


def default_crf_workers(local_processes: int = 1) -> int:
    """CRF worker processes of one rank when ``method.eval.crf_workers`` is null: the rank's CPU
    cores less one for the loop itself (at least one).

    Args:
        local_processes: Processes of the run on this node (they share its cores).
    """
    from cause_lightning.core.system import cores_per_rank

    return max(1, cores_per_rank(local_processes) - 1)


def stage_crf_runner(eval_cfg: Any, local_processes: int) -> CRFRunner | None:
    """The eval stage's CRF pool from ``method.eval``, or None when no variant refines or
    pydensecrf is missing (the CRF variants are then skipped with a warning).

    Args:
        eval_cfg: ``method.eval`` (``variants``, ``crf_workers``, ``crf_timeout``,
            ``crf_iterations``).
        local_processes: Processes of the run on this node (they share its cores).
    """
    if not any("crf" in v for v in eval_cfg.variants):
        return None
    if not crf_available():
        log.warning(
            "pydensecrf is not installed: CRF variants skipped "
            '(pip install "cause-lightning[crf]" to report the published protocol)'
        )
        return None
    workers = eval_cfg.crf_workers
    if workers is None:
        workers = default_crf_workers(local_processes)
    return CRFRunner(
        num_workers=int(workers),
        timeout=float(eval_cfg.crf_timeout),
        iterations=int(eval_cfg.crf_iterations),
    )
