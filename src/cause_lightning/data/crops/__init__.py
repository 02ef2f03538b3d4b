"""Pre-computed training crops, STEGO style (``docs/protocol.md`` §3).

Recipes (crops are cut from the full-resolution original, after the label has been mapped to class
ids):

=========  ===============  ========================================================================
recipe     crops per image  definition
=========  ===============  ========================================================================
``five``   5                five-crop at ratio r (default 0.5): top-left, top-right, bottom-left,
                            bottom-right, centre
``double`` 20               ten-crop at r = 0.5, then ten-crop at r = 0.8
``super``  50               ten-crop at r = 0.3, 0.4, 0.5, 0.6, 0.7, in that order
=========  ===============  ========================================================================

* Crop size for ratio r on an ``H x W`` image: ``(int(H * r), int(W * r))`` (the reference's
  truncation). The corner boxes are those of torchvision's ``five_crop``; the centre box starts at
  ``int(round((H - h) / 2))`` / ``int(round((W - w) / 2))``, torchvision's ``center_crop`` rounding
  (Python's round: halves to even).
* Ten-crop = the five crops of the image, then the five crops of its horizontal flip (same order).
* Crop ``i`` of a cache is ``i = image_index * crops_per_image + position``, images in source-list
  order.
* Files: ``<cache>/img/train/<i>.jpg`` (RGB, PIL's default JPEG quality) and
  ``<cache>/label/train/<i>.png`` (uint8, **class + 1**, so 0 = ignore). The cache folder is
  ``<prefix>_five_crop_<r>``, ``<prefix>_double_crop_0`` or ``<prefix>_super_crop_0`` under
  ``<dataset dir>/cropped/``.
* ``manifest.json`` (written last) records the source list, its line count and sha256, the recipe
  and the crop count; a cache whose manifest disagrees with the requested one is refused
  (:class:`CropCacheMismatchError`).
* Writing is resumable: every file is written to a temporary name and renamed, crops that exist and
  decode are never rewritten, and an interrupted run simply continues.
"""

from __future__ import annotations

from cause_lightning.data.crops.cache import (
    CROP_TOOL_VERSION,
    CropCacheMismatchError,
    CropCacheSpec,
    CropCacheStatus,
    inspect_crop_cache,
    list_sha256,
    read_manifest,
)
from cause_lightning.data.crops.codec import (
    LABEL_ENCODING,
    crop_label_lut,
    decode_crop_label,
    encode_crop_label,
)
from cause_lightning.data.crops.dataset import CropDataset
from cause_lightning.data.crops.recipes import (
    RECIPES,
    CropRecipe,
    cache_folder_name,
    crop_boxes,
    crop_size,
    get_recipe,
    make_crops,
)
from cause_lightning.data.crops.writer import build_crop_cache
from cause_lightning.data.progress import make_progress

__all__ = [
    "CROP_TOOL_VERSION",
    "LABEL_ENCODING",
    "RECIPES",
    "CropCacheMismatchError",
    "CropCacheSpec",
    "CropCacheStatus",
    "CropDataset",
    "CropRecipe",
    "build_crop_cache",
    "cache_folder_name",
    "crop_boxes",
    "crop_label_lut",
    "crop_size",
    "decode_crop_label",
    "encode_crop_label",
    "get_recipe",
    "inspect_crop_cache",
    "list_sha256",
    "make_crops",
    "make_progress",
    "read_manifest",
]
