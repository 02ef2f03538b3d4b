"""Importing a class that a config or an artifact names by its import path.

Artifacts name the classes that rebuild their models (a head's ``target``); loading one imports that
class and nothing else: a name that is not a class of the expected kind is refused before anything
is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_class"]


def import_class(target: str, base: type, what: str) -> type:
    """Import the class ``target`` (``"package.module.Class"``) and check that it subclasses
    ``base``.

    Args:
        target: Import path of the class.
        base: The class it must derive from (e.g. ``nn.Module``).
        what: What the class is, for messages (``"head class"``).

    Returns:
        The class.

    Raises:
        ImportError: When it cannot be imported (the message names it and says what to put on the
            Python path).
        TypeError: When ``target`` names something that is not a subclass of ``base``.
    """
    module_name, _, name = target.rpartition(".")
    try:
        found: Any = importlib.import_module(module_name) if module_name else None
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError) as err:
        top = target.split(".")[0]
        raise ImportError(
            f"cannot import the {what} {target!r} ({type(err).__name__}: {err}). Put the folder "
            f"that holds the package or module {top!r} on the Python path (e.g. export "
            f"PYTHONPATH=/path/to/that/folder:$PYTHONPATH) or install the package that provides "
            "it, then load again"
        ) from err
    if not (isinstance(found, type) and issubclass(found, base)):
        raise TypeError(
            f"{target!r} is {type(found).__name__}, not a {base.__name__} class; a {what} name "
            "may only name such a class"
        )
    return found
