"""The skill zoo's measured tables, rendered from the stored files, and the sections they fill.

``assets/skills/skills.json`` (written by ``scripts/build_skills.py eval``) and ``assets/skills/lab.json``
(``scripts/skills_lab.py collect``) are the measurements; docs/skills.md and the README show them between
``<!-- tag -->`` … ``<!-- /tag -->`` markers. The scripts write those sections with these functions and
``tests/test_llm_skills.py`` renders them again from the stored files, so a table that no longer equals
its measurement fails a test instead of going stale.
"""

from __future__ import annotations

__all__ = ["lab_curve_table", "lab_pair_table", "pct", "recipe", "replace_section", "section", "skills_table", "variants_table"]


def pct(rate: float, ci: list[float]) -> str:
    """A rate with its interval, in percent: "94.2% (88.4–97.2)"."""
    return f"{100 * rate:.1f}% ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})"


def skills_table(results: dict) -> str:
    """One row per skill of ``skills.json``: rule rates with and without the adapter, facts kept, update
    size and training time."""
    lines = ["| skill | rule | rule held, adapter (95% CI) | rule held, base alone (95% CI) | "
             "instructions only: adapter / base | facts kept (95% CI) | of them, countries never trained on | "
             "median ‖ΔW‖/‖W0‖ | train time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["skills"].items():
        t = r["train"]
        instr = r.get("instructions")
        instr_cell = (f"{instr['adapter']}/{instr['n']} / {instr['base']}/{instr['n']}" if instr else "–")
        lines.append(f"| `{name}` | {r['rule']} | {pct(r['rule_rate_adapter'], r['rule_ci_adapter'])} | "
                     f"{pct(r['rule_rate_base'], r['rule_ci_base'])} | {instr_cell} | "
                     f"{r['fact_kept']}/{r['fact_base_right']} = {pct(r['fact_retention'], r['fact_ci'])} | "
                     f"{_unseen(r)} | {t['delta_ratio_median']:.4f} | "
                     f"{t['train_s'] / 60:.1f} min ({t['settings']['steps']} steps, {t['median_step_s']:.1f} s/step) |")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    if row.get("refused"):
        return "refused"
    return f"{100 * row['rate']:.0f}% ({100 * row['ci'][0]:.0f}–{100 * row['ci'][1]:.0f})"


def lab_pair_table(lab: dict) -> str:
    """Every compatible pair × (base, each skill alone, every lab row): both rules held, with intervals."""
    labels = ["base", "1st alone", "2nd alone", *lab["rows"]]
    lines = ["| pair | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for key, entry in lab["pairs"].items():
        by = {r["label"]: r for r in entry["rows"]}
        first, second = entry["skills"]
        by["1st alone"], by["2nd alone"] = by.get(f"{first} alone"), by.get(f"{second} alone")
        lines.append(f"| {key} | " + " | ".join(_cell(by[c]) if by.get(c) else "–" for c in labels) + " |")
    return "\n".join(lines)


def lab_curve_table(lab: dict) -> str:
    """All rules held by number of skills merged, for the curve's rows."""
    lines = ["| skills merged | " + " | ".join(lab["curve_rows"]) + " |", "|---" * (len(lab["curve_rows"]) + 1) + "|"]
    for entry in sorted(lab["curve"].values(), key=lambda e: len(e["skills"])):
        by = {r["label"]: r for r in entry["rows"]}
        lines.append(f"| {len(entry['skills'])}: {'+'.join(entry['skills'])} | "
                     + " | ".join(_cell(by[c]) if c in by else "–" for c in lab["curve_rows"]) + " |")
    return "\n".join(lines)


def _markers(tag: str) -> tuple[str, str]:
    return f"<!-- {tag} -->", f"<!-- /{tag} -->"


def section(text: str, tag: str) -> str | None:
    """The body between a tag's markers (without the newlines around it), or None when ``text`` lacks them."""
    start, end = _markers(tag)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def replace_section(text: str, tag: str, body: str) -> str:
    """``text`` with the body between a tag's markers replaced; unchanged when the markers are absent."""
    start, end = _markers(tag)
    if start not in text or end not in text:
        return text
    before, rest = text.split(start, 1)
    return before + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def recipe(settings: dict) -> str:
    """A training recipe in a few words, from a skill's recorded settings."""
    modules = settings.get("target_modules", [])
    which = "every linear" if "gate_proj" in modules else ("attention" if "k_proj" in modules else "+".join(modules))
    layers = settings.get("layers_to_transform") or []
    where = f"layers {layers[0]}–{layers[-1]}" if layers else "all layers"
    data = ["clean facts" if settings.get("clean_facts") else "raw facts"]
    if settings.get("extra_facts"):
        data.append("+2 fact phrasings")
    return f"{which}, {where}, lr {settings.get('lr')}, {', '.join(data)}"


def _unseen(r: dict) -> str:
    unseen = r.get("facts_unseen")
    return f"{unseen['kept']}/{unseen['base_right']}" if unseen else "–"


def variants_table(variants: list[tuple[str, dict]]) -> str:
    """What was tried: one row per (variant, skill) of the stored ``skills.json`` files, in the given order."""
    lines = ["| variant | recipe | steps | skill | held-out prompts | rule held (95% CI) | facts kept (95% CI) | "
             "of them, unseen countries | median ‖ΔW‖/‖W0‖ |", "|---|---|---|---|---|---|---|---|---|"]
    for label, results in variants:
        for name, r in results["skills"].items():
            st = r["train"]["settings"]
            lines.append(f"| {label} | {recipe(st)} | {st['steps']} | `{name}` | {results.get('n_heldout', '–')} | "
                         f"{pct(r['rule_rate_adapter'], r['rule_ci_adapter'])} | {r['fact_kept']}/{r['fact_base_right']} = "
                         f"{pct(r['fact_retention'], r['fact_ci'])} | {_unseen(r)} | {r['train']['delta_ratio_median']:.4f} |")
    return "\n".join(lines)
