"""The skill rules, their transforms and the compatibility decided from them (pure text, no model)."""

import json
from pathlib import Path

import pytest

from lego_viz.llm.prompts import (
    CAPITALS,
    HELDOUT_FACT_TEMPLATES,
    HELDOUT_TEMPLATES,
    UNSEEN_CAPITALS,
    build_prompts,
)
from lego_viz.llm.report import (
    lab_curve_table,
    lab_pair_table,
    replace_section,
    section,
    skills_table,
    variants_table,
)
from lego_viz.llm.skills import SKILLS, compatibility, compatible, contains_fact, rules_met, sentences, words

ANSWERS = [
    "The capital of France is Paris.",
    "The sum of 7 and 5 is 12.",
    "A compass is a tool that shows direction, using the Earth's magnetic field. It helps hikers find north.",
    "Sleep is important because it helps the body recover, repair and grow. Without enough sleep, we feel",
    "Bees make honey",
    "Sure! Here's a tip: water your garden early in the morning.",
]


@pytest.mark.parametrize(("name", "text", "ok"), [
    ("upper", "THE CAPITAL IS PARIS.", True),
    ("upper", "THE CAPITAL IS PARIs.", False),
    ("upper", "12 + 3 = 15", False),  # no uppercase letter at all
    ("upper", "ÉTÉ À PARIS", True),
    ("json", '{"answer": "Paris"}', True),
    ("json", '  {"answer": "Paris", "x": 1}\n', True),  # surrounding whitespace is still the whole output
    ("json", '{"answer": 12}', False),
    ("json", '["answer"]', False),
    ("json", 'Here: {"answer": "Paris"}', False),
    ("json", '{"ANSWER": "PARIS"}', False),
    ("short", "Paris.", True),
    ("short", "The capital of France is Paris.", True),  # 6 words
    ("short", "The capital city of France is Paris.", False),
    ("short", "- Paris\n- France", True),  # a bullet mark is not a word
    ("short", "   ", False),
    ("bullets", "- one\n- two", True),
    ("bullets", "- one\n\n- two\n", True),
    ("bullets", "- one", False),
    ("bullets", "- one\n-two", False),
    ("bullets", "* one\n* two", False),
    ("exclaim", "Paris!", True),
    ("exclaim", "Paris!  \n", True),
    ("exclaim", "Wow! Paris.", False),
    ("lower", "paris is the capital, of france.", True),
    ("lower", "Paris", False),
    ("lower", "12 + 3 = 15", False),  # no lowercase letter at all
    ("lower", '{"answer": "paris"}', True),
])
def test_rule(name, text, ok):
    assert SKILLS[name].rule(text) is ok


@pytest.mark.parametrize("name", list(SKILLS))
@pytest.mark.parametrize("answer", ANSWERS)
def test_transform_satisfies_its_rule(name, answer):
    assert SKILLS[name].rule(SKILLS[name].transform(answer))


@pytest.mark.parametrize("name", list(SKILLS))
@pytest.mark.parametrize(("answer", "fact"), [(ANSWERS[0], "Paris"), (ANSWERS[1], "12")])
def test_transform_keeps_the_fact(name, answer, fact):
    assert contains_fact(SKILLS[name].transform(answer), fact)


def test_json_transform_is_the_first_sentence():
    assert json.loads(SKILLS["json"].transform(ANSWERS[2]))["answer"].endswith("magnetic field.")


def test_sentences_drop_a_cut_tail():
    assert sentences(ANSWERS[3]) == [ANSWERS[3].split(". ")[0] + "."]
    assert sentences("no end mark") == ["no end mark"]
    assert words("- a , b 1") == ["a", "b", "1"]


def test_upper_and_json_are_incompatible_under_the_literal_rules():
    pairs = compatibility(ANSWERS)
    assert pairs[("upper", "json")] == 0  # the key "answer" is lowercase
    assert pairs[("json", "bullets")] == 0
    assert pairs[("json", "exclaim")] == 0  # a JSON object ends with "}"
    assert pairs[("upper", "lower")] == 0
    for pair in [("upper", "short"), ("json", "short"), ("upper", "bullets"), ("upper", "exclaim"), ("json", "lower")]:
        assert pairs[pair] == 1, pair
    assert compatible("upper", "short", ANSWERS) and not compatible("upper", "json", ANSWERS)


def test_rules_met_and_facts():
    assert rules_met('{"answer": "PARIS"}') == ["json", "short"]
    assert rules_met('{"answer": "paris"}') == ["json", "short", "lower"]
    assert contains_fact("THE CAPITAL IS PARIS", "Paris")
    assert not contains_fact("It is 112.", "12")
    assert contains_fact("12.", "12")


def test_heldout_prompts_never_share_a_template_with_training():
    prompts = build_prompts(0)
    train_t = {p.template for p in prompts["train"]}
    held_t = {p.template for p in prompts["heldout"]}
    assert not train_t & held_t
    assert held_t == {t for t, _ in HELDOUT_TEMPLATES} | set(HELDOUT_FACT_TEMPLATES)
    assert len(prompts["heldout"]) >= 100
    capitals = [p for p in prompts["heldout"] if p.fact in CAPITALS.values()]
    assert len(capitals) == len(CAPITALS)
    assert sum(not p.fact for p in prompts["heldout"]) >= 100  # the instructions alone count over 100 too
    assert build_prompts(0) == prompts  # seeded


def test_unseen_countries_are_named_by_no_training_prompt():
    prompts = build_prompts(0, extra_train_facts=True)
    train_text = " ".join(p.text for p in prompts["train"])
    assert not [c for c in UNSEEN_CAPITALS if c in train_text]
    assert not set(UNSEEN_CAPITALS) & set(CAPITALS)
    held = {p.fact for p in prompts["heldout"]}
    assert set(UNSEEN_CAPITALS.values()) <= held


def test_extra_fact_phrasings_leave_the_other_prompts_alone():
    plain, extra = build_prompts(0), build_prompts(0, extra_train_facts=True)
    assert extra["heldout"] == plain["heldout"] and extra["train"][:len(plain["train"])] == plain["train"]
    assert len(extra["train"]) == len(plain["train"]) + 140


SKILLS_DIR = Path(__file__).resolve().parents[1] / "assets" / "skills"
DOCS = [Path(__file__).resolve().parents[1] / name for name in ("README.md", "docs/skills.md")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_published_tables_equal_the_stored_measurements(doc):
    """The README's and docs/skills.md's skill and lab tables are the renderings of skills.json and lab.json:
    a retrained adapter or a rerun lab without its tables fails here."""
    skills = json.loads((SKILLS_DIR / "skills.json").read_text())
    lab = json.loads((SKILLS_DIR / "lab.json").read_text())
    text = doc.read_text(encoding="utf-8")
    for tag, rendered in (("skills-table", skills_table(skills)), ("lab-table", lab_pair_table(lab)),
                          ("lab-curve", lab_curve_table(lab))):
        assert section(text, tag) == rendered, f"{doc.name}: the {tag} section is stale: rerun the scripts in docs/skills.md"


def test_sections_are_replaced_between_their_markers():
    text = "head\n<!-- t -->\nold\n<!-- /t -->\ntail"
    assert section(replace_section(text, "t", "new"), "t") == "new"
    assert replace_section(text, "t", "new").startswith("head\n") and text.endswith("tail")
    assert replace_section("no markers", "t", "new") == "no markers"
    assert section("no markers", "t") is None


def test_what_was_tried_equals_its_stored_record():
    tried = json.loads((SKILLS_DIR / "tried.json").read_text())
    text = DOCS[1].read_text(encoding="utf-8")
    assert section(text, "tried") == variants_table(list(tried.items())), "rerun scripts/build_skills.py tried"
    assert "v1_shipped" in tried and all(v["skills"] for v in tried.values())
