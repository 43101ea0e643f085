"""Every merge method, in the order menus and messages list them.

A method is a :class:`~lego_viz.merge.base.MergeMethod` defined beside its function, in its own module;
this table is the one place that names them all (as mergekit's registry does). Menus show the
baselines and LoRA-LEGO first, then the merge lab's methods, then PEFT's own rules. A new method is
one module plus one line here.
"""

from __future__ import annotations

from collections.abc import Mapping

from lego_viz.merge import core_space, exact, knots, lego, peft_style
from lego_viz.merge.base import MergeError, MergeMethod

METHODS: tuple[MergeMethod, ...] = (
    exact.LINEAR,
    exact.SVD,
    lego.LEGO,
    core_space.CORE_SPACE,
    knots.KNOTS,
    peft_style.PEFT_LINEAR,
    peft_style.TIES,
    peft_style.DARE_LINEAR,
)

MERGE_METHODS: dict[str, MergeMethod] = {method.name: method for method in METHODS}


def user_options(method: str, options: Mapping[str, object], where: str = "") -> dict:
    """Refuse what is not a declared option of ``method`` (lego also takes ``preset``).

    Options from a command line or a config go into calls whose other keyword arguments (``checks``,
    ``errors``, ``group_bytes``, ``weights``, ...) are the program's own: only a method's declared
    options may come from a user. An unknown method passes through (:func:`lego_viz.merge.api.plan` names it).

    Args:
        where: how the message names the place the options came from (``"config x.yaml: parameters"``).
    """
    spec = MERGE_METHODS.get(method)
    if spec is None:
        return dict(options)
    valid = [*spec.options, *(("preset",) if spec.name == "lego" else ())]
    unknown = [str(name) for name in options if name not in valid]
    if unknown:
        shown = ", ".join(name if len(name) <= 40 else name[:40] + "…" for name in unknown[:5])
        raise MergeError(f"{where + ': ' if where else ''}unknown option(s) {shown} for method {method!r}; "
                         f"valid options: {', '.join(valid) or 'none'}.")
    return dict(options)
