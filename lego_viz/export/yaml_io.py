"""Reading YAML that users give (merge configs, recipes) with bounded time and memory.

``yaml.safe_load`` builds whatever a file describes: an alias bomb ("billion laughs") is a few hundred
bytes that expand to gigabytes once anything walks the result (a ``repr`` in an error message did),
20,000 levels of ``[[[...`` end in a RecursionError, and ``--config /dev/zero`` reads for ever. Here the
file must be a regular file under :data:`MAX_CONFIG_BYTES`, and the parser's events are measured before
any Python object is built: depth, size with every alias expanded, and integers too long for ``int()``.
Messages name the line and key, and show values cut short (:func:`lego_viz.adapters.types.shown`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from lego_viz.adapters.files import FileTooLarge, NotRegularFile, read_capped
from lego_viz.adapters.types import AdapterError, shown

MAX_CONFIG_BYTES = 512 << 10  # a recipe of 1,000 adapters is ~250 kB; libyaml reads 1 MB in 3 s
MAX_DEPTH = 64  # a config nests 4 levels
MAX_EXPANDED = 4 * MAX_CONFIG_BYTES  # characters and nodes, with every alias expanded
MAX_INT_DIGITS = 100  # ranks, seeds and counts; int() refuses past 4,300 digits with a message that names nothing



class ConfigError(AdapterError):
    """A merge config is malformed; the message names the key and the valid choices."""


def read_yaml(path: str | os.PathLike, what: str = "config"):
    """Parse the YAML file at ``path`` within the bounds above.

    Args:
        what: how messages name the file (``"config"``, ``"recipe"``).

    Raises:
        ConfigError: a missing, unreadable, non-regular or oversized file, invalid YAML, or a document
            past the bounds.
    """
    path = Path(path)
    label = f"{what} {path}"
    text = _read_text(path, label)
    try:
        _check_events(text, label)
        return yaml.load(text, Loader=_LOADER)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0][:200]
        if "increasing flow level" in reason or "increasing indent level" in reason:  # libyaml's own depth limit
            raise ConfigError(f"{label} nests deeper than {MAX_DEPTH} levels; a merge config nests 4.") from None
        raise ConfigError(f"{label} is not valid YAML ({reason}).") from None


def _read_text(path: Path, label: str) -> str:
    try:
        data = read_capped(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read ({exc.strerror}).") from None
    except NotRegularFile:
        raise ConfigError(f"{label} is not a regular file (a folder, device or pipe); give a YAML file.") from None
    except FileTooLarge:
        raise ConfigError(f"{label} is larger than {MAX_CONFIG_BYTES >> 10} KiB; a merge config is a few kB: "
                          "is this the right file?") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label} is not valid YAML (not UTF-8 text at byte {exc.start}).") from None


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it
_COLLECTION_START = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_COLLECTION_END = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


@dataclass
class _Open:
    """A collection being read: its size so far (aliases expanded), its anchor, and for a mapping the last key."""

    anchor: str | None
    mapping: bool
    size: int = 1
    items: int = 0
    key: object = None


def _key(stack: list[_Open]) -> str:
    """How a message names the node being read: the innermost key it is (inside) the value of."""
    for frame in reversed(stack):
        if frame.mapping and frame.items % 2 == 1:
            return f"key {shown(frame.key)}"
    return "a value"


def _check_events(text: str, label: str) -> None:
    """Walk the parser's events (no objects built) and refuse depth, expansion and long integers past the bounds."""
    stack: list[_Open] = []
    sizes: dict[str, int] = {}  # anchor → size of its closed node
    for event in yaml.parse(text, Loader=_LOADER):
        where = f"{label} line {event.start_mark.line + 1}"
        top = stack[-1] if stack else None
        key = _key(stack)
        if isinstance(event, _COLLECTION_START):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(f"{where}: {key} nests deeper than {MAX_DEPTH} levels; a merge config nests 4.")
            stack.append(_Open(event.anchor, isinstance(event, yaml.MappingStartEvent)))
            continue
        if isinstance(event, _COLLECTION_END):
            closed = stack.pop()
            size, anchor = closed.size, closed.anchor
            top = stack[-1] if stack else None
            key = _key(stack)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:  # still open (an undefined one the loader reports)
                if any(frame.anchor == event.anchor for frame in stack):
                    raise ConfigError(f"{where}: alias *{event.anchor:.40} refers to a node it is inside; "
                                      "a config cannot be recursive.")
                continue
            size, anchor = sizes[event.anchor], None
        elif isinstance(event, yaml.ScalarEvent):
            size, anchor = 1 + len(event.value), event.anchor
            digits = event.value.lstrip("+-").replace("_", "")
            if not event.style and len(digits) > MAX_INT_DIGITS and digits.isdigit():  # plain: libyaml says ""
                raise ConfigError(f"{where}: {key} holds a whole number of {len(digits)} digits; "
                                  f"expected at most {MAX_INT_DIGITS}.")
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        if top is not None:
            if top.mapping and top.items % 2 == 0:
                top.key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
            top.items += 1
            top.size += size
            if top.size > MAX_EXPANDED:
                raise ConfigError(f"{where}: {key} expands to over {MAX_EXPANDED >> 20} M characters through its "
                                  "aliases (an alias bomb?); write the values out.")
