"""Command-line overrides that name no setting, caught before the run with the closest names.

Hydra refuses ``sed=1`` with "Key 'sed' is not in struct" and the advice to append it with ``+``,
which then silently adds an unused key. :func:`unknown_override` composes the config as the run will
(a sweep with its first value: whether a key exists does not depend on the value) and, when an
override names no setting, says which one and the settings spelt most like it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["command_line_overrides", "unknown_override"]

# Hydra's flags that take a value as the next argument; those that change which config is read
# leave the check to Hydra.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
_OTHER_CONFIG = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def command_line_overrides(argv: Sequence[str]) -> list[str] | None:
    """The overrides among command-line arguments, or ``None`` when a flag picks another config.

    Args:
        argv: The arguments after the program name.
    """
    overrides: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _OTHER_CONFIG:
            return None
        if arg.startswith("-"):
            skip = flag in _FLAGS_WITH_VALUE and "=" not in arg
            continue
        overrides.append(arg)
    return overrides


def unknown_override(config_dir: str, overrides: Sequence[str]) -> str | None:
    """Why an override names no setting, with the closest setting names, or ``None``.

    Only a key that is not in the composed config is reported here; every other problem (syntax,
    a missing group option, a value out of range) is left to Hydra and to the settings check.

    Args:
        config_dir: The Hydra config root.
        overrides: Command-line overrides (``key=value``, ``group=option``, ``+key=value``, ...).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # a syntax error: Hydra's own message says where
        return None
    # One value per swept key: whether the key exists does not depend on it.
    single = [line for line in map(_one_value, parsed) if line is not None]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose("config", overrides=single)
            return None
        except ConfigCompositionException as err:
            key = _missing_key(err)
            if key is None:
                return None
        others = [_one_value(o) for o in parsed if o.key_or_group != key]
        others = [o for o in others if o is not None]
        try:
            cfg = compose("config", overrides=others)
        except Exception:
            return None
    known = list(_leaf_keys(OmegaConf.to_container(cfg, resolve=False)))
    matches = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(matches)}?)" if matches else ""
    return (
        f"{key} is not a setting{hint}: check its spelling (`python -m cause_lightning --cfg job` "
        "prints every setting); a new key would be added with +"
        f"{key}=..., but nothing reads it unless a class takes it as an argument"
    )


def _one_value(override: Any) -> str | None:
    """An override with its first swept value (``seed=0,1`` -> ``seed=0``); ``None`` when its
    values are only known to the sweeper (``glob``)."""
    if not override.is_sweep_override():
        return str(override.input_line)
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:
        return None
    return f"{override.get_key_element()}={first}"


def _missing_key(err: BaseException) -> str | None:
    """The full key an override could not set, from the OmegaConf error under Hydra's."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
            return str(cause.full_key)
        cause = cause.__cause__ or cause.__context__
    return None


def _leaf_keys(tree: Any, prefix: str = "") -> Any:
    """Every setting of a config tree by its full key (``method.head.temperature``)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaf_keys(value, f"{name}.")
        else:
            yield name
