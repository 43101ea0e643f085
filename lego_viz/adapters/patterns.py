"""Module-name patterns from files and command lines, matched as PEFT matches them, in bounded time.

PEFT looks a module up in ``rank_pattern`` / ``alpha_pattern`` with ``re.match(rf"(.*\\.)?({key})$",
name)``: a key matches a module name that ends in it (after a dot), and a key may be any regex. Keys
come from adapter configs (uploads, in the public app) and from ``--k`` patterns, and on Python's
backtracking engine a key like ``(a|a)*c`` runs for minutes while holding the GIL: one upload stalled
every user of the app.

Here a key made only of name characters (letters, digits, ``_``, ``-``, ``.``, ``\\.``: what PEFT writes) runs
on :mod:`re`, where it cannot backtrack beyond a scan of the name; any other key runs on RE2
(``google-re2``), whose matching is linear in the name whatever the pattern. RE2 has no lookarounds
or backreferences: such a key is refused with a message. The ``regex`` package's ``timeout=`` was
tried first and is not enough: inside a lookahead it is never checked (``(?=(a|a)*c)`` on 24 a's ran
13 s under ``timeout=5``). Patterns and names are bounded in length, and one table's lookups together
in time. Measured on the 2-core dev machine under load: an 80-layer config whose 560 keys are module
names looks up every module in 0.5 s on ``re`` (3 µs a match), and in 1.9 s with 560 keys that need
RE2 (12 µs a match), within :data:`PATTERN_SECONDS`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

import re2

from lego_viz.adapters.types import AdapterError, shown

MAX_PATTERN_CHARS = 1000  # the longest PEFT module name is ~100 characters
MAX_NAME_CHARS = 4096  # module names matched against patterns
PATTERN_SECONDS = 5.0  # every lookup in one table together
# Keys that cannot backtrack beyond a scan of the name: name characters and escaped dots (re.escape of a
# module name, as lego_viz.merge.advise writes them).
_PLAIN = re.compile(r"(?:[A-Za-z0-9_.\-]|\\\.)+")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad key is our message on stderr, not RE2's log lines


class PatternTable:
    """PEFT's rank_pattern / alpha_pattern lookup over one mapping of keys to values, with a time budget.

    Args:
        patterns: key (a regex matched against the end of a module name) → value; None for none.
        what: how messages name a key (``"adapter 'x': rank_pattern key"``, ``"k pattern"``).
        seconds: time for every :meth:`value` call on this table together.

    Raises:
        AdapterError: a key that is not a string, too long or not a valid regex.
    """

    def __init__(self, patterns: Mapping | None, what: str, seconds: float = PATTERN_SECONDS) -> None:
        self.what = what
        self.seconds = seconds
        self.deadline: float | None = None
        self.entries: list[tuple[str, object, bool, object]] = []
        for key, value in (patterns or {}).items():
            if not isinstance(key, str) or not key:
                raise AdapterError(f"{what} {shown(key)} is not a module name or pattern (a non-empty string).")
            if len(key) > MAX_PATTERN_CHARS:
                raise AdapterError(f"{what} {shown(key)} is longer than {MAX_PATTERN_CHARS} characters; "
                                   "give the module name or its ending, e.g. q_proj.")
            plain = _PLAIN.fullmatch(key) is not None
            try:
                compiled = re.compile(rf"(.*\.)?({key})$") if plain else re2.compile(rf"(.*\.)?({key})$", _RE2_OPTIONS)
            except (re.error, re2.error) as exc:
                reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise AdapterError(f"{what} {shown(key)} is not a valid regular expression here ({reason}; "
                                   "lookarounds and backreferences are not supported).") from None
            self.entries.append((key, compiled, plain, value))

    def value(self, module: str, default):
        """The value of the first key that matches ``module`` (PEFT's order), else ``default``."""
        for key, compiled, plain, value in self.entries:
            if self._match(key, compiled, plain, module):
                return value
        return default

    def keys_matching_none(self, modules: Sequence[str]) -> list[str]:
        """The keys that match none of ``modules``, each tried on its own (typos, in a ``--k`` mapping)."""
        return [key for key, compiled, plain, _ in self.entries
                if not any(self._match(key, compiled, plain, module) for module in modules)]

    def _match(self, key: str, compiled, plain: bool, module: str) -> bool:
        if len(module) > MAX_NAME_CHARS:
            raise AdapterError(f"module name {shown(module)} is longer than {MAX_NAME_CHARS} characters; "
                               f"{self.what} cannot be matched against it.")
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        if time.monotonic() > self.deadline:  # each match is linear in the name; only their number is left
            raise AdapterError(f"{self.what} {shown(key)}: matching the keys against the module names took over "
                               f"{self.seconds:g} s (too many keys or names); give fewer keys.")
        return compiled.match(module) is not None


def pattern_value(patterns: Mapping | None, module: str, default, what: str = "pattern"):
    """PEFT's rank_pattern / alpha_pattern lookup of one module (see :class:`PatternTable`)."""
    return PatternTable(patterns, what).value(module, default)


def peft_patterns(config: Mapping, modules: Sequence[str], label: str, default_alpha: float) -> dict[str, dict]:
    """``rank_pattern`` and ``alpha_pattern`` with each key replaced by the escaped names of the modules
    whose value it sets: what PEFT gets when it loads an adapter from a user, so that PEFT's own lookup
    (Python's backtracking ``re``) never runs a user's regex. The values per module are unchanged.

    Args:
        config: the adapter's config (validated).
        modules: the names of its modules (as in its tensors, without ``base_model.model.``).
        default_alpha: PEFT's ``lora_alpha`` where the config gives none.
    """
    defaults = {"rank_pattern": config.get("r"), "alpha_pattern": config.get("lora_alpha", default_alpha)}
    resolved = {}
    for key, default in defaults.items():
        table = PatternTable(config.get(key), f"{label}: {key} key")
        resolved[key] = {re.escape(module): value for module in modules
                         if (value := table.value(module, default)) != default}
    return resolved
