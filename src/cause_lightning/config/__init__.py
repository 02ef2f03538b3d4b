"""The configuration: what each setting may hold, the checks run before any work, derived values.

* :mod:`~cause_lightning.config.schema`: the settings of the pipeline itself, each with its type
  and range; a stage module's hyper-parameters are typed and bounded in its own signature.
* :mod:`~cause_lightning.config.validate`: :func:`validate`, run on every composed config before
  anything is built: types, ranges, unknown or unread keys (with the closest known ones and the
  file they belong to), the rules between settings.
* :mod:`~cause_lightning.config.derive`: :func:`derive`, the values that need the backbone (patch
  size) and the process count: resolutions, the query count, effective learning rates.
* :mod:`~cause_lightning.config.files`: where ``conf/`` is, and :func:`compose` from Python.

Defaults are written once, in the YAML files of ``conf/``.
"""

from cause_lightning.config.derive import derive, snap_resolution, to_plain
from cause_lightning.config.files import compose, config_dir, stage_module
from cause_lightning.config.validate import SettingsError, validate

__all__ = [
    "SettingsError",
    "compose",
    "config_dir",
    "derive",
    "snap_resolution",
    "stage_module",
    "to_plain",
    "validate",
]
