"""Every check a composed config passes before any work starts.

* The pipeline's own settings (:data:`~cause_lightning.config.schema.SCHEMA`): type, range,
  presence, and no unknown key.
* Every ``_target_`` node (stage modules, heads, data modules, backbone, optimisers, schedules,
  trainer, loggers, callbacks): each key must be an argument of the class or function it names,
  of the type and in the range of that argument's annotation (``Annotated[float, POSITIVE]``).
* Every key of a ``method.<stage>`` section must be read: by the pipeline (the schema) or by one
  of the section's ``_target_`` nodes through an interpolation (``temperature: ${..temperature}``).
* The rules between settings (thresholds, over-clustering counts, trainer options a stage owns).

An unknown key is reported with the file it belongs to and the closest known keys. All problems
are reported together, as one :class:`SettingsError`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
import types
import typing
from collections import abc
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cause_lightning.config.schema import SCHEMA, Open, Setting, Target, Targets
from cause_lightning.core.bounds import COUNT, SIMILARITY, Bound, check_overcluster
from cause_lightning.core.errors import SettingsError
from cause_lightning.core.system import memory_bytes

__all__ = ["SettingsError", "closest", "validate"]

# Trainer options that every stage sets from `method`: an override would be silently replaced.
_STAGE_OWNED = {
    "trainer.max_epochs": "method.<stage>.epochs (method.mediator.epochs, method.head.epochs, "
    "method.probe.epochs)",
    "trainer.min_epochs": "method.<stage>.epochs",
    "trainer.gradient_clip_val": "method.head.clip / method.probe.clip",
}
# Keys of a `_target_` node that Hydra reads itself.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_INTERPOLATION = re.compile(r"\$\{([^${}]+)")


def closest(name: str, known: Any) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the known names closest to ``name``, or ``""``."""
    matches = difflib.get_close_matches(str(name), [str(k) for k in known], n=3, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def validate(cfg: DictConfig) -> None:
    """Check a composed config before anything is built.

    Args:
        cfg: The composed config.

    Raises:
        SettingsError: Naming every problem: the setting, its value, what it accepts, and for an
            unknown key the file it belongs to and the closest known keys.
    """
    problems: list[str] = []
    plain = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    read = set(_interpolated_keys(plain))
    _check_node(cfg, SCHEMA, "", problems, read)
    problems.extend(_rules(cfg))
    if problems:
        raise SettingsError("invalid settings (nothing was run):\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------ schema walk
def _check_node(
    node: Any, schema: Mapping[str, Any], path: str, problems: list[str], read: set[str]
) -> None:
    if not isinstance(node, DictConfig):
        problems.append(f"{path} must be a group of settings, got {_show(node)}")
        return
    for key, rule in schema.items():
        name = _join(path, key)
        if key not in node:
            if getattr(rule, "required", False):
                problems.append(f"{name} is missing ({_origin(name)})")
            continue
        value = _value(node, key)
        if isinstance(rule, Open):
            continue
        if isinstance(rule, Setting):
            if (error := _setting_error(value, rule)) is not None:
                problems.append(f"{name}={_show(value)} must be {error}")
        elif isinstance(rule, Target):
            if value is None and rule.optional:
                continue
            _check_target(node[key], name, problems)
        elif isinstance(rule, Targets):
            if value is None:
                continue
            for entry in node[key]:
                _check_target(node[key][entry], _join(name, str(entry)), problems)
        else:  # a nested group
            _check_node(node[key], rule, name, problems, read)
    for key in node:
        if key in schema:
            continue
        name = _join(path, str(key))
        if name in read and path.startswith("method"):
            continue  # a hyper-parameter handed to a class through an interpolation
        problems.append(_unknown(name, str(key), schema, path))


def _unknown(name: str, key: str, schema: Mapping[str, Any], path: str) -> str:
    hint = closest(key, schema)
    text = f"{name} is not a setting ({_origin(name)}){hint}"
    if path.startswith("method.") and path.count(".") == 1:
        stage = path.split(".")[1]
        text += (
            f"; a new hyper-parameter of this stage is an argument of method.{stage}.module's "
            f"class and is handed to it in conf/method/cause.yaml ({key}: ${{..{key}}} under "
            f"method.{stage}.module)"
        )
    return text


def _value(node: DictConfig, key: str) -> Any:
    try:
        value = node[key]
    except Exception as err:  # an interpolation that does not resolve
        return _Unresolved(err)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    return value


class _Unresolved:
    def __init__(self, err: Exception) -> None:
        self.err = err

    def __repr__(self) -> str:
        return f"<unresolved: {str(self.err).splitlines()[0]}>"


def _setting_error(value: Any, rule: Setting) -> str | None:
    error = _type_error(value, rule.type)
    if error is None and rule.bound is not None and value is not None:
        if not rule.bound.accepts(value):
            return rule.bound.describe()
    return error


# ------------------------------------------------------------------------------ _target_ nodes
def _check_target(node: Any, path: str, problems: list[str]) -> None:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        problems.append(f"{path} must be a node with a _target_, got {_show(_plain(node))}")
        return
    target = str(node._target_)
    try:
        obj = _locate(target)
    except (ImportError, AttributeError) as err:
        problems.append(
            f"{path}._target_={target!r} cannot be imported ({type(err).__name__}: {err}); put "
            "its package on the Python path or fix the name"
        )
        return
    parameters, hints, open_keywords = _signature(obj)
    raw = OmegaConf.to_container(node, resolve=False)
    for key in node:
        key = str(key)
        if key in _HYDRA_KEYS:
            continue
        source = _source(path, raw.get(key)) if isinstance(raw, dict) else None
        name = source or _join(path, key)
        if key not in parameters:
            if not open_keywords:
                problems.append(
                    f"{name}: {target} takes no argument {key!r} ({_origin(_join(path, key))})"
                    f"{closest(key, parameters)}"
                )
            continue
        value = _value(node, key)
        if isinstance(value, _Unresolved):
            problems.append(f"{name} does not resolve: {value.err}")
            continue
        annotation = hints.get(key)
        if annotation is None or isinstance(value, dict) and "_target_" in value:
            continue
        if (error := _annotation_error(value, annotation)) is not None:
            problems.append(f"{name}={_show(value)} must be {error} ({target} argument {key!r})")


def _locate(target: str) -> Any:
    module_name, _, name = target.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _signature(obj: Any) -> tuple[set[str], dict[str, Any], bool]:
    """Parameter names, resolved annotations and whether ``**kwargs`` takes any other name.

    A class whose constructor passes ``**kwargs`` on to its base takes the base's parameters too:
    the bases are read until a constructor without ``**kwargs``.
    """
    functions = []
    if isinstance(obj, type):
        for cls in obj.__mro__:
            if "__init__" in vars(cls) and cls is not object:
                functions.append(vars(cls)["__init__"])
                if not _passes_kwargs(functions[-1]):
                    break
    else:
        functions.append(obj)
    names: set[str] = set()
    hints: dict[str, Any] = {}
    open_keywords = True
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return names, hints, True
        try:
            found = typing.get_type_hints(function, include_extras=True)
        except Exception:  # annotations that name types only imported for type checkers
            found = {}
        for p in parameters:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
                if p.name in found and p.name not in hints:
                    hints[p.name] = found[p.name]
        open_keywords = _passes_kwargs(function)
    return names, hints, open_keywords


def _passes_kwargs(function: Any) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in parameters)


def _annotation_error(value: Any, annotation: Any) -> str | None:
    """What ``value`` should be for ``annotation`` (type and ``Annotated`` bound), or ``None``."""
    bound = None
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extras = typing.get_args(annotation)
        bound = next((e for e in extras if isinstance(e, Bound)), None)
    error = _type_error(value, annotation)
    if error is None and bound is not None and value is not None and not bound.accepts(value):
        return bound.describe()
    return error


def _type_error(value: Any, annotation: Any) -> str | None:
    """``None`` when ``value`` fits ``annotation`` (or the annotation is not a plain-value type),
    else the type it should have, in words."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if annotation is None or annotation is type(None):
        return None if value is None else "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _annotation_error(value, annotation)
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(value, arg) for arg in args]
        return None if any(e is None for e in errors) else " or ".join(filter(None, errors))
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if numeric else "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    container = origin or annotation
    if container in (list, tuple, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
        if item is not None and any(_type_error(v, item) is not None for v in value):
            return f"a list of {_describe(item)}"
        return None
    if container in (dict, abc.Mapping):
        return None if isinstance(value, dict) else "a mapping"
    return None  # a runtime object (module, tensor, callable): not something a YAML value holds


def _describe(annotation: Any) -> str:
    names = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


# ------------------------------------------------------------------------------ interpolations
def _interpolated_keys(tree: Any, path: str = "") -> Iterator[str]:
    """Absolute keys that interpolations anywhere in ``tree`` read (``${..x}`` made absolute)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _interpolated_keys(value, _join(path, str(key)))
    elif isinstance(tree, list):
        for value in tree:
            yield from _interpolated_keys(value, path)
    elif isinstance(tree, str):
        for expression in _INTERPOLATION.findall(tree):
            for reference in _references(expression):
                yield _absolute(path, reference)


def _references(expression: str) -> list[str]:
    """The keys an interpolation expression names (``a.b``, ``..x``, ``oc.select:a.b,...``)."""
    if ":" in expression:
        resolver, _, arguments = expression.partition(":")
        if resolver.strip() in ("oc.env", "now", "hydra"):
            return []
        return [a.strip() for a in arguments.split(",") if a.strip() and "${" not in a]
    return [expression.strip()]


def _absolute(path: str, reference: str) -> str:
    """``reference`` as seen from the node at ``path`` (relative ``..x`` resolved)."""
    if not reference.startswith("."):
        return reference
    dots = len(reference) - len(reference.lstrip("."))
    parts = path.split(".")[:-dots] if path else []
    rest = reference[dots:]
    return ".".join([*parts, rest] if rest else parts)


def _source(path: str, raw: Any) -> str | None:
    """The setting a node argument reads when it is one plain interpolation (``${..x}``)."""
    if not isinstance(raw, str):
        return None
    match = re.fullmatch(r"\$\{([^${}:]+)\}", raw.strip())
    return _absolute(_join(path, "_"), match.group(1)) if match else None


# ------------------------------------------------------------------------------ rules
def _rules(cfg: DictConfig) -> list[str]:
    problems = []
    for key, owner in _STAGE_OWNED.items():
        if OmegaConf.select(cfg, key, default=None) is not None:
            problems.append(f"{key} is set per stage and would be ignored: set {owner} instead")
    head = OmegaConf.select(cfg, "method.head", default=None)
    if isinstance(head, DictConfig):
        pos, neg = _safe(head, "pos_thresh"), _safe(head, "neg_thresh")
        if SIMILARITY.accepts(pos) and SIMILARITY.accepts(neg) and neg > pos:
            problems.append(
                f"method.head.neg_thresh={neg} must not exceed method.head.pos_thresh={pos}"
            )
    problems.extend(_memory_rule(cfg))
    overcluster = OmegaConf.select(cfg, "method.eval.overcluster", default=None)
    classes = OmegaConf.select(cfg, "data.num_classes", default=None)
    if overcluster is not None and isinstance(classes, int) and not isinstance(classes, bool):
        try:
            check_overcluster(overcluster, classes)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _memory_rule(cfg: DictConfig) -> list[str]:
    """The concept bank's size, fixed by the settings alone, against the machine's memory: a
    count typed with a few zeros too many is refused here rather than by the allocator after
    the backbone was built."""
    keys = ("method.num_concepts", "method.head.bank_capacity", "method.head.projection_dim")
    values = [OmegaConf.select(cfg, key, default=None) for key in keys]
    if not all(COUNT.accepts(v) for v in values):
        return []  # a missing or out-of-range count has its own message
    from cause_lightning.models.bank import ConceptBank  # torch: not for a command-line check

    needed = math.prod(ConceptBank.storage_shape(*values)) * 4  # float32 projections
    available = memory_bytes()
    if available is None or needed <= available:
        return []
    settings = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return [
        f"{settings} make a concept bank of {needed / 2**30:,.1f} GiB, more than this "
        f"machine's {available / 2**30:,.1f} GiB of memory: lower one of them"
    ]


def _safe(node: DictConfig, key: str) -> Any:
    try:
        return node.get(key)
    except Exception:
        return None


# ------------------------------------------------------------------------------ messages
_GROUPS = ("stage", "data", "backbone", "head", "method", "trainer", "logger", "callbacks", "paths")


def _origin(name: str) -> str:
    """Where a key comes from: its group's file, or the primary config; overrides may set it too."""
    group = name.split(".")[0]
    choice = _choices().get(group)
    if group in _GROUPS and choice:
        return f"conf/{group}/{choice}.yaml, an experiment preset or a command-line override"
    return "conf/config.yaml, an experiment preset or a command-line override"


def _choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v}
    except Exception:  # outside a Hydra run: no group choices to name
        pass
    return {}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
