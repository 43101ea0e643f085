"""Turn exceptions from the core into messages in the browser, never stack traces.

A handler that raises `gr.Error` leaves every output, the session state included, as it was,
so a failed action keeps the previous state. Expected errors (bad input) show their own
message; anything else is logged with its traceback on the server and shown as a short
"internal error" message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

from lego_viz.adapters import AdapterError, printable

F = TypeVar("F", bound=Callable)
log = logging.getLogger("lego_viz.ui")

# Raised by the core on bad input; their messages are written for users.
USER_ERRORS = (AdapterError, ValueError, KeyError, FileNotFoundError)
# A toast longer than this (a folder listing hundreds of adapters) is cut in the middle: the start
# says what is wrong, the end what to do.
MAX_MESSAGE_CHARS = 600


def _message(exc: BaseException) -> str:
    # KeyError's str() wraps the message in quotes.
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    # File names that are not UTF-8 arrive as surrogate escapes, which Gradio cannot send: the
    # browser would wait forever for the answer. Show those bytes as \xNN instead.
    text = printable(text)
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    tail = MAX_MESSAGE_CHARS // 4
    return text[: MAX_MESSAGE_CHARS - tail - 3] + " … " + text[-tail:]


def user_errors(fn: F) -> F:
    """Decorate an event handler so that its failures reach the user as `gr.Error` messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(_message(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"internal error ({type(exc).__name__}: {_message(exc)}); the session is unchanged.", print_exception=False) from None

    return wrapper  # type: ignore[return-value]
