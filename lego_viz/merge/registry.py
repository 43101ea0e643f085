"""Every merge method, in the order menus and messages list them.

A method is a :class:`~lego_viz.merge.base.MergeMethod` defined beside its function, in its own module;
this table is the one place that names them all (as mergekit's registry does). Menus show the
baselines and LoRA-LEGO first, then the merge lab's methods, then PEFT's own rules. A new method is
one module plus one line here.
"""

from __future__ import annotations

from lego_viz.merge import core_space, exact, knots, lego, peft_style
from lego_viz.merge.base import MergeMethod

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
