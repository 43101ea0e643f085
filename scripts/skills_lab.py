"""Composition lab on the SmolLM2 skill zoo: which merge keeps both skills of a compatible pair?

    .venv/bin/python scripts/skills_lab.py pairs --pairs upper+short json+short --part a
    .venv/bin/python scripts/skills_lab.py curve --set upper short exclaim bullets --part c
    .venv/bin/python scripts/skills_lab.py collect      # parts → assets/skills/lab.json + docs/skills.md

Every row of `lego_viz.llm.lab.LAB_ROWS` runs at k = 8 (one source's rank) on the same held-out prompts
(an even spread of scripts/build_skills.py's held-out set, templates never trained on); a prompt counts when
the output meets every rule of the set. Each part is written after every row, so an interrupted run keeps
what it measured. One torch thread (see scripts/build_skills.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lego_viz.adapters import load_adapter  # noqa: E402
from lego_viz.llm.lab import LAB_ROWS, both_rules, score_set, wilson  # noqa: E402
from lego_viz.llm.report import lab_curve_table, lab_pair_table, replace_section  # noqa: E402
from lego_viz.models.smollm2 import load_base, resolve_base  # noqa: E402

WORK = ROOT / "build" / "llm_skills"
ASSETS = ROOT / "assets" / "skills"
DOCS = ROOT / "docs" / "skills.md"
README = ROOT / "README.md"
K = 8
N_PROMPTS = 100  # ±10 points at 95% (every other held-out prompt: 60 instructions, 20 capitals, 20 sums)
MAX_NEW_TOKENS = 32
CURVE_ROWS = ("exact sum", "lego", "svd", "arrow units")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def lab_prompts(n: int) -> tuple[list[int], list[str]]:
    rows = json.loads((WORK / "base_answers.json").read_text())["heldout"]
    idx = list(range(0, len(rows), max(1, len(rows) // n)))[:n]
    return idx, [rows[i]["prompt"] for i in idx]


def alone_rows(skills: list[str], idx: list[int], cut) -> list[dict]:
    """Base and each adapter alone on the same prompts, from the skill evaluation's stored outputs cut to
    the lab's token budget (a greedy answer's first tokens are the shorter greedy answer)."""
    base = json.loads((WORK / "base_answers.json").read_text())["heldout"]
    out = []
    stored = {s: json.loads((WORK / f"outputs_{s}.json").read_text()) for s in skills}  # each file read once
    for label, outs in [("base", [cut(base[i]["answer"]) for i in idx])] + [
            (f"{s} alone", [cut(stored[s][i]) for i in idx]) for s in skills]:
        held = both_rules(outs, skills)
        out.append(dict(label=label, skills=skills, k=None, rate=round(held / len(idx), 4), ci=list(wilson(held, len(idx))),
                        held=held, n=len(idx), per_rule={s: both_rules(outs, [s]) for s in skills}, seconds=0.0,
                        refused=""))
    return out


def run_set(model, tok, skills: list[str], rows, part: Path, key: str, n: int) -> None:
    idx, prompts = lab_prompts(n)
    adapters = [load_adapter(ASSETS / s, name=s) for s in skills]
    data = json.loads(part.read_text()) if part.exists() else {}
    entry = data.setdefault(key, {"skills": skills, "idx": idx, "rows": []})
    done = {r["label"] for r in entry["rows"]}
    todo = [r for r in rows if r[0] not in done]
    for row in score_set(model, tok, adapters, prompts, k=K, rows=todo, max_new_tokens=MAX_NEW_TOKENS):
        entry["rows"].append(row.as_dict())
        part.write_text(json.dumps(data, indent=1))
        log(f"{key}: {row.label} {row.held}/{row.n} ({row.seconds:.0f} s){' refused: ' + row.refused if row.refused else ''}")


def collect() -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base())

    def cut(text: str) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:MAX_NEW_TOKENS]).strip()

    parts = sorted(WORK.glob("lab_part_*.json"))
    pairs, curve = {}, {}
    for part in parts:
        for key, entry in json.loads(part.read_text()).items():
            missing = [s for s in entry["skills"] if not (WORK / f"outputs_{s}.json").exists()]
            if not missing:  # base and each adapter alone, from the skill evaluation's outputs
                entry["rows"] = alone_rows(entry["skills"], entry["idx"], cut) + entry["rows"]
            (curve if key.startswith("curve:") else pairs)[key] = entry
    for entry in list(curve.values()):  # the curve's first point is the pair table's row of its first two skills
        pair = "+".join(entry["skills"][:2])
        if pair in pairs and f"curve:{pair}" not in curve:
            curve[f"curve:{pair}"] = {**pairs[pair], "rows": [r for r in pairs[pair]["rows"]
                                                               if r["label"] in CURVE_ROWS or "alone" in r["label"]]}
    skills = json.loads((ASSETS / "skills.json").read_text())
    lab = dict(k=K, n_prompts=N_PROMPTS, max_new_tokens=MAX_NEW_TOKENS, rows=[r[0] for r in LAB_ROWS], curve_rows=list(CURVE_ROWS),
               compatible_pairs=skills["compatible_pairs"], incompatible_pairs=skills["incompatible_pairs"],
               pairs=pairs, curve=curve,
               not_run=[f"{a}+{b}" for a, b in skills["compatible_pairs"] if f"{a}+{b}" not in pairs])
    (ASSETS / "lab.json").write_text(json.dumps(lab, indent=1) + "\n")
    write_docs(lab)
    return lab


def write_docs(lab: dict) -> None:
    """The lab's pair table and curve in docs/skills.md and the README (between their markers)."""
    for path in (DOCS, README):
        text = path.read_text()
        text = replace_section(text, "lab-table", lab_pair_table(lab))
        path.write_text(replace_section(text, "lab-curve", lab_curve_table(lab)))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["pairs", "curve", "collect"])
    parser.add_argument("--pairs", nargs="*", default=[], help="pairs as a+b")
    parser.add_argument("--set", nargs="*", default=[], help="curve: the skills, merged 2, 3, … at a time in this order")
    parser.add_argument("--part", default="a", help="name of this run's part file (parallel runs use different parts)")
    parser.add_argument("--n", type=int, default=N_PROMPTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.stage == "collect":
        lab = collect()
        log(f"wrote {ASSETS / 'lab.json'} ({len(lab['pairs'])} pairs, {len(lab['curve'])} curve points)")
        return
    torch.set_num_threads(args.threads)
    model, tok = load_base()
    part = WORK / f"lab_part_{args.part}.json"
    if args.stage == "pairs":
        for pair in args.pairs:
            run_set(model, tok, pair.split("+"), LAB_ROWS, part, pair, args.n)
    else:
        rows = [r for r in LAB_ROWS if r[0] in CURVE_ROWS]
        for size in range(3, len(args.set) + 1):  # size 2 is the pair table's row
            run_set(model, tok, args.set[:size], rows, part, "curve:" + "+".join(args.set[:size]), args.n)


if __name__ == "__main__":
    main()
