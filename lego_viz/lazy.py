"""torch, imported on first use.

The ``merge`` command's lego path runs on numpy alone, and torch's import (~2 s of CPU on a 2-core
machine) costs more than that whole merge. Modules on the path name torch through :data:`torch`,
which imports the real module the first time one of its attributes is used, so that a run which
never touches torch never imports it. Nothing else changes for those modules.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands in for a module: the first attribute access imports it, and each attribute is then kept."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:  # only for attributes not found (kept) yet
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


torch = LazyModule("torch")
