"""Where the SmolLM2 skill zoo lives in the repository: the adapters and the composition lab file.

``scripts/build_skills.py`` writes one PEFT folder per skill to ``assets/skills/<skill>/`` and the
composition lab to ``assets/skills/lab.json``; the app, the benchmark and the tests find them here.
"""

from __future__ import annotations

import json
from pathlib import Path

from lego_viz.llm.skills import SKILLS

__all__ = ["LAB_FILE", "SKILLS_DIR", "lab_rows", "read_lab", "skill_dirs"]

SKILLS_DIR = Path(__file__).resolve().parents[2] / "assets" / "skills"
LAB_FILE = SKILLS_DIR / "lab.json"
BUILD_HINT = "build them with `python scripts/build_skills.py all`"
_ROW_KEYS = {"label", "skills", "rate"}


def skill_dirs(root: str | Path | None = None) -> dict[str, Path]:
    """Skill name → adapter folder, for every folder under ``root`` (default :data:`SKILLS_DIR`) holding an
    ``adapter_config.json``; the named skills of :data:`~lego_viz.llm.skills.SKILLS` first, in their order."""
    root = Path(root) if root is not None else SKILLS_DIR
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()} if root.is_dir() else {}
    order = [name for name in SKILLS if name in found] + [name for name in found if name not in SKILLS]
    return {name: found[name] for name in order}


def read_lab(path: str | Path | None = None) -> dict | None:
    """The composition lab file as JSON, or None when it is not there.

    Raises:
        ValueError: the file is there but is not a JSON object (rebuild it).
    """
    path = Path(path) if path is not None else LAB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} cannot be read ({type(exc).__name__}); rebuild it with scripts/build_skills.py") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} does not hold a JSON object; rebuild it with scripts/build_skills.py")
    return data


def lab_rows(data: object) -> list[dict]:
    """Every measured row in a lab file, wherever it sits: objects with ``label``, ``skills`` and ``rate``
    (:meth:`lego_viz.llm.lab.LabRow.as_dict`), in file order, each (skills, label) once (the curve's
    first point repeats the pair table's rows)."""
    unique: dict[tuple, dict] = {}
    for row in _rows(data):
        unique.setdefault((tuple(map(str, row["skills"])), str(row["label"])), row)
    return list(unique.values())


def _rows(data: object) -> list[dict]:
    if isinstance(data, dict):
        if data.keys() >= _ROW_KEYS and isinstance(data["skills"], list):
            return [data]
        return [row for value in data.values() for row in _rows(value)]
    if isinstance(data, list):
        return [row for value in data for row in _rows(value)]
    return []
