"""The real-LLM skill zoo on SmolLM2-135M-Instruct (the base itself: :mod:`lego_viz.models.smollm2`).

* :mod:`~lego_viz.llm.skills` — the code-checkable rules, their target transforms, compatibility;
* :mod:`~lego_viz.llm.prompts` — the instruction set, held out by template;
* :mod:`~lego_viz.llm.generate` — batched greedy answers with the chat template;
* :mod:`~lego_viz.llm.train` — one LoRA per skill on the base's own transformed answers;
* :mod:`~lego_viz.llm.lab` — every merge method on sets of skills, with intervals;
* :mod:`~lego_viz.llm.report` — the measured tables, rendered from the stored files.

Built by ``scripts/build_skills.py`` and ``scripts/skills_lab.py``; results in ``docs/skills.md``.
"""
