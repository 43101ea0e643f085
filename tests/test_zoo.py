"""The demo zoo: tokenizer, tasks, batches, decoding, evaluation, the shipped assets and the build."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego_viz.zoo.build import BuildConfig
from lego_viz.zoo.data import IGNORE_INDEX, encode_pairs, mixture_batch, task_batch
from lego_viz.zoo.evaluate import evaluate, generate, with_mean
from lego_viz.zoo.model import (
    ZOO_DIR,
    ZooModelConfig,
    adapter_dirs,
    build_model,
    family_dirs,
    load_adapted,
    load_base,
)
from lego_viz.zoo.tasks import N_HELD_OUT, PRETRAIN_TASKS, TASKS, Task, get_task, held_out, training_example
from lego_viz.zoo.tokenizer import CHARS, build_tokenizer
from lego_viz.zoo.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RANK = BuildConfig().rank
SHIPPED = (ZOO_DIR / "zoo_card.json").is_file()
needs_assets = pytest.mark.skipif(not SHIPPED, reason="assets/zoo not built (run scripts/build_zoo.py)")
# The shipped zoo meets the regime's five targets; the stretch goal (six-way exact sum >= 50%) it misses at
# 46% (README "Demo zoo"), and this floor sits under that so a rebuild that falls back fails here.
MET_TARGETS = (
    "own_task_min",
    "base_skills_kept_min",
    "relative_update_norm_median_max",
    "half_weight_retention_min",
    "pairwise_linear_retention_mean_min",
)
STRETCH_FLOOR = 0.4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = ZooModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return build_model(config, tokenizer).eval()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_after_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "swapcase: " + CHARS + "="
    ids = reloaded(text)["input_ids"]
    # One token per character plus the leading <s>.
    assert len(ids) == len(text) + 1 and ids[0] == reloaded.bos_token_id
    assert ids == tokenizer(text)["input_ids"]
    assert reloaded.decode(ids, skip_special_tokens=True) == text
    assert reloaded.padding_side == "left"


def test_tokenizer_maps_unknown_characters_to_unk(tokenizer):
    ids = tokenizer("a?", add_special_tokens=False)["input_ids"]
    assert ids[1] == tokenizer.unk_token_id and ids[0] != tokenizer.unk_token_id


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize(
    ("name", "text", "answer"),
    [
        ("reverse", "abc", "cba"),
        ("sort", "3141", "1134"),
        ("caesar", "xyz", "yza"),
        ("double", "ab", "aabb"),
        ("swapcase", "LoRA", "lOra"),
        ("count", "banana", "3"),
    ],
)
def test_task_answers(name, text, answer):
    task = TASKS[name]
    assert task.solve(text) == answer
    assert task.prompt(text) == f"{name}: {text}="


def test_at_least_six_tasks_and_names_disjoint_from_pretraining():
    assert len(TASKS) >= 6
    assert not set(TASKS) & set(PRETRAIN_TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_held_out_is_fixed_unique_and_never_trained_on(name, tokenizer):
    pairs = held_out(name)
    assert len(pairs) == N_HELD_OUT == len({prompt for prompt, _ in pairs})
    assert held_out(name, 10) == pairs[:10]
    task = TASKS[name]
    assert all(task.solve(prompt[len(name) + 2 : -1]) == answer for prompt, answer in pairs)
    # Every character of every prompt and answer is in the vocabulary.
    assert set("".join(p + a for p, a in pairs)) <= set(CHARS)
    prompts = {prompt for prompt, _ in pairs}
    rng = random.Random(0)
    drawn = [training_example(task, rng)[0] for _ in range(3000)]
    assert not prompts & set(drawn)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_base_learns_each_skill_under_its_own_word_never_on_held_out_inputs(name):
    from lego_viz.zoo.tasks import ALIAS_OF, ALIASES

    alias = PRETRAIN_TASKS[ALIASES[name]]
    assert ALIAS_OF[alias.name] == name and alias.name not in TASKS
    held_inputs = {prompt[len(name) + 2 : -1] for prompt, _ in held_out(name)}
    rng = random.Random(1)
    drawn = [training_example(alias, rng) for _ in range(3000)]
    assert all(answer == TASKS[name].solve(prompt[len(alias.name) + 2 : -1]) for prompt, answer in drawn)
    # Same input distribution as the zoo task (so the inputs do meet), but never one of its held-out inputs.
    inputs = {prompt[len(alias.name) + 2 : -1] for prompt, _ in drawn}
    assert not inputs & held_inputs
    assert {len(text) for text in inputs} == {len(text) for text in held_inputs}


def test_held_out_does_not_depend_on_the_process():
    # str hashing is salted per process; the held-out set must not be.
    code = "from lego_viz.zoo.tasks import held_out; print(held_out('reverse', 5))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout for _ in range(2)}
    assert outputs == {f"{held_out('reverse', 5)}\n"}


def test_task_validation():
    with pytest.raises(ValueError, match="identifier"):
        Task("two words", "x", lambda rng: "a", str.upper, ())
    with pytest.raises(ValueError, match="characters"):
        TASKS["reverse"].prompt("a?b")
    with pytest.raises(KeyError, match="known tasks"):
        get_task("nope")
    with pytest.raises(ValueError, match="held-out size"):
        held_out("reverse", N_HELD_OUT + 1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BuildConfig(families=("add",)), "unknown task"),
        (lambda: BuildConfig(rank=0), "rank must be"),
        (lambda: BuildConfig(subsets_per_count=0), "subsets_per_count"),
        (lambda: BuildConfig(eval_n=0), "eval_n"),
        (lambda: TrainConfig(steps=0), "steps"),
        (lambda: TrainConfig(steps=5, warmup_steps=6), "warmup_steps"),
        (lambda: ZooModelConfig(hidden_size=30, num_attention_heads=4), "divisible"),
    ],
)
def test_configs_reject_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_recipe_trains_every_task_and_two_families_at_one_rank():
    # One rank: the equal-rank methods (peft_linear, ties, dare_linear) can merge the whole zoo.
    config = BuildConfig()
    assert config.adapter_names[: len(TASKS)] == list(TASKS)
    assert len(config.families) >= 2 and config.adapter_names[len(TASKS) :] == [f"{t}_b" for t in config.families]


# --------------------------------------------------------------------------- batches


def test_encode_pairs_masks_everything_but_the_answer(tokenizer):
    batch = encode_pairs([("count: ab=", "1"), ("double: ab=", "aabb")], tokenizer)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len("double: ab=aabb") + 2)
    for row, (prompt, answer) in enumerate([("count: ab=", "1"), ("double: ab=", "aabb")]):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert kept == [*tokenizer.convert_tokens_to_ids(list(answer)), tokenizer.eos_token_id]
        assert batch["attention_mask"][row].sum() == len(prompt) + len(answer) + 2
    # Right padding: pads only after the sequence.
    assert batch["input_ids"][0, -1] == tokenizer.pad_token_id and batch["attention_mask"][0, -1] == 0


def test_batches_are_seeded(tokenizer):
    first = task_batch(TASKS["sort"], 8, random.Random(3), tokenizer)
    again = task_batch(TASKS["sort"], 8, random.Random(3), tokenizer)
    other = mixture_batch(list(PRETRAIN_TASKS.values()), 8, random.Random(3), tokenizer)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"][:, :5], other["input_ids"][:, :5])


# --------------------------------------------------------------------------- decoding and evaluation


def test_generate_batched_equals_one_by_one(tiny_model, tokenizer):
    # Left padding must not change a greedy completion.
    prompts = ["count: ab=", "swapcase: aBcDeF=", "sort: 31="]
    together = generate(tiny_model, tokenizer, prompts, max_new_tokens=5)
    alone = [generate(tiny_model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert all(set(text) <= set(CHARS) for text in together)


class _Oracle(torch.nn.Module):
    """Answers from a lookup table through `generate`; `wrong` names tasks it answers wrongly."""

    def __init__(self, tokenizer, wrong: set[str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong = tokenizer, wrong
        self.answers = {p: a for name in TASKS for p, a in held_out(name)}

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = []
        for prompt in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            answer = self.answers[prompt] + ("x" if prompt.split(":")[0] in self.wrong else "")
            ids = [*self.tokenizer.convert_tokens_to_ids(list(answer)), self.tokenizer.eos_token_id]
            rows.append((ids + [self.tokenizer.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_evaluate_is_exact_match(tokenizer):
    scores = evaluate(_Oracle(tokenizer, wrong={"sort"}), tokenizer, tasks=["reverse", "sort"], n=7)
    assert scores == {"reverse": 1.0, "sort": 0.0}
    assert with_mean(scores)["mean"] == 0.5


def test_evaluate_tiny_model_on_tiny_n(tiny_model, tokenizer):
    scores = evaluate(tiny_model, tokenizer, n=3)
    assert list(scores) == list(TASKS)
    assert all(0.0 <= value <= 1.0 and value * 3 == round(value * 3) for value in scores.values())


# --------------------------------------------------------------------------- shipped assets


@needs_assets
def test_shipped_assets_load_and_match_the_card():
    card = json.loads((ZOO_DIR / "zoo_card.json").read_text())
    model, tokenizer = load_base(device="cpu")
    assert sum(p.numel() for p in model.parameters()) == card["model"]["parameters"]
    assert tokenizer.decode(tokenizer("reverse: abc=")["input_ids"], skip_special_tokens=True) == "reverse: abc="
    dirs = {**adapter_dirs(), **family_dirs()}
    assert list(adapter_dirs()) == list(TASKS) and len(family_dirs()) >= 2
    assert [entry["name"] for entry in card["adapter_list"]] == list(dirs)
    for entry in card["adapter_list"]:
        path = dirs[entry["name"]]
        assert path == ZOO_DIR / entry["path"]
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["r"] == card["adapters"][entry["name"]]["rank"] == entry["rank"]
        assert (path / "adapter_model.safetensors").is_file()
    assert len({entry["rank"] for entry in card["adapter_list"]}) == 1  # equal-rank methods take them all
    size = sum(f.stat().st_size for f in (REPO / "assets").rglob("*") if f.is_file())
    assert size < 30 * 2**20


@needs_assets
@pytest.mark.parametrize("name", list(TASKS))
def test_each_adapter_beats_the_base_on_its_task(name):
    # 40 held-out prompts: the card reports >= 90% for each adapter and <= 20% for the base on
    # 200 prompts, so on any 40 of them a 0.5 margin can only fail if the adapter is broken.
    base, tokenizer = load_base(device="cpu")
    base_score = evaluate(base, tokenizer, [name], n=40)[name]
    adapted, _ = load_adapted(adapter_dirs()[name], device="cpu")
    assert evaluate(adapted, tokenizer, [name], n=40)[name] >= base_score + 0.5


@needs_assets
def test_evaluate_takes_a_folder_and_a_merge():
    from lego_viz.adapters import load_adapter
    from lego_viz.merge import merge

    dirs = adapter_dirs()
    by_folder = evaluate(dirs["caesar"], tasks=["caesar"], n=10)
    model, tokenizer = load_adapted(dirs["caesar"], device="cpu")
    assert by_folder == evaluate(model, tokenizer, ["caesar"], n=10)
    # A merge of one adapter at k = r without reweighting is that adapter (ARCHITECTURE §4).
    adapter = load_adapter(dirs["caesar"], name="caesar")
    merged = merge([adapter], method="lego", k=adapter.ranks[0], param_reweight="none", output_reweight=False)
    assert evaluate(merged, tasks=["caesar"], n=10) == by_folder


@needs_assets
def test_shipped_card_targets_follow_from_its_measurements():
    import statistics

    from lego_viz.zoo.targets import TARGETS

    card = json.loads((ZOO_DIR / "zoo_card.json").read_text())
    targets = card["targets"]
    measured, own = targets["measured"], targets["own_task"]
    assert targets["targets"] == TARGETS and targets["n_per_task"] == card["evaluation"]["n_per_task"] == 200
    by_count = targets["linear_retention_by_count"]
    assert list(by_count) == [str(k) for k in range(2, len(TASKS) + 1)] and len(by_count["2"]["subsets"]) == 15
    for entry in by_count.values():
        for row in entry["subsets"]:
            assert row["retention"] == pytest.approx(statistics.mean(row["accuracy"][t] / own[t] for t in row["adapters"]))
        assert entry["mean"] == pytest.approx(statistics.mean(row["retention"] for row in entry["subsets"]))
    assert measured["own_task_min"] == min(own.values())
    assert measured["pairwise_linear_retention_mean_min"] == by_count["2"]["mean"]
    assert measured["all_linear_retention_min"] == by_count[str(len(TASKS))]["mean"]
    assert measured["half_weight_retention_min"] == min(targets["half_weight_retention"].values())
    assert measured["base_skills_kept_min"] == min(targets["base_skills_kept"].values())
    for key, value in measured.items():
        assert targets["met"][key] == (value <= TARGETS[key] if key.endswith("_max") else value >= TARGETS[key])
    assert [key for key in MET_TARGETS if not targets["met"][key]] == []
    assert measured["all_linear_retention_min"] >= STRETCH_FLOOR
    assert card["accuracy"]["adapters_own_task"] == {**own, **{n: card["adapters"][n]["accuracy_own_task"] for n in family_dirs()}}


@needs_assets
def test_shipped_adapter_and_its_half_weight_reproduce_the_card():
    from lego_viz.adapters import load_adapter
    from lego_viz.checks.invariance import lora_hooks
    from lego_viz.zoo.targets import scaled

    full_card = json.loads((ZOO_DIR / "zoo_card.json").read_text())
    card = full_card["targets"]
    base, tokenizer = load_base(device="cpu")
    # reverse: the largest update of the zoo and the one most sensitive to its weight (card: 95.5% at 0.5)
    adapter = load_adapter(adapter_dirs()["reverse"], name="reverse")
    threads = torch.get_num_threads()
    # the build's thread count: the same sums in the same order, so the same greedy tokens
    torch.set_num_threads(full_card["build"]["machine"]["torch_threads"])
    try:
        with lora_hooks(base, adapter.modules):
            full = evaluate(base, tokenizer, ["reverse"], n=card["n_per_task"])["reverse"]
        with lora_hooks(base, scaled(adapter.modules, 0.5)):
            half = evaluate(base, tokenizer, ["reverse"], n=card["n_per_task"])["reverse"]
    finally:
        torch.set_num_threads(threads)
    assert full == card["own_task"]["reverse"]
    assert half / full == card["half_weight_retention"]["reverse"]


@needs_assets
def test_a_pairwise_linear_merge_through_export_keeps_both_tasks():
    from lego_viz.adapters import load_adapter
    from lego_viz.merge import merge

    card = json.loads((ZOO_DIR / "zoo_card.json").read_text())["targets"]
    pair = card["linear_retention_by_count"]["2"]["subsets"][0]
    dirs = adapter_dirs()
    merged = merge([load_adapter(dirs[name], name=name) for name in pair["adapters"]], method="linear")
    scores = evaluate(merged, tasks=pair["adapters"], n=50)  # export → PeftModel.from_pretrained, as a user
    for name in pair["adapters"]:
        # The card's accuracy is on 200 prompts, these 50 are its first quarter: even if every miss fell
        # among them, at most 4x the missed fraction is lost here; 2 more prompts allow for greedy
        # ties decided differently by PEFT's layers than by the build's hooks (same sum, other order).
        assert scores[name] >= 1 - 4 * (1 - pair["accuracy"][name]) - 2 / 50, (name, scores, pair)


# --------------------------------------------------------------------------- build script and CLI


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo"
    run = subprocess.run(
        [sys.executable, "scripts/build_zoo.py", "--smoke", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_build_smoke_writes_a_loadable_zoo(smoke_zoo):
    card = json.loads((smoke_zoo / "zoo_card.json").read_text())
    assert set(card["accuracy"]["base"]) == {*TASKS, "mean"}
    assert list(adapter_dirs(smoke_zoo)) == list(TASKS)
    assert list(family_dirs(smoke_zoo)) == [f"{task}_b" for task in BuildConfig().families]
    assert set(card["targets"]["met"]) == set(card["targets"]["targets"])
    assert list(card["targets"]["linear_retention_by_count"]) == [str(k) for k in range(2, len(TASKS) + 1)]
    assert set(card["families"]) == set(BuildConfig().families)
    model, tokenizer = load_adapted(adapter_dirs(smoke_zoo)["double"], device="cpu", zoo_dir=smoke_zoo)
    assert len(generate(model, tokenizer, ["double: ab="], max_new_tokens=3)) == 1
    assert card["adapters"]["double"]["rank"] == json.loads((smoke_zoo / "adapters/double/adapter_config.json").read_text())["r"]


def test_build_is_deterministic(smoke_zoo, tmp_path):
    from safetensors.torch import load_file

    run = subprocess.run(
        [sys.executable, "scripts/build_zoo.py", "--smoke", "--out", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = [
        "base/model.safetensors",
        *(f"{entry['path']}/adapter_model.safetensors" for entry in json.loads((smoke_zoo / "zoo_card.json").read_text())["adapter_list"]),
    ]
    for file in files:
        first, second = load_file(smoke_zoo / file), load_file(tmp_path / "again" / file)
        assert first.keys() == second.keys()
        # Same seeds, same ops, one thread: bit-identical weights.
        assert all(torch.equal(first[key], second[key]) for key in first), file
    cards = [json.loads((folder / "zoo_card.json").read_text()) for folder in (smoke_zoo, tmp_path / "again")]
    assert cards[0]["targets"] == cards[1]["targets"] and cards[0]["families"] == cards[1]["families"]


def test_merge_table_runs_every_row_through_export(smoke_zoo):
    from lego_viz.zoo.table import MERGE_ROWS, merge_table, table_markdown

    table = merge_table(smoke_zoo, n=2, device="cpu")
    assert list(table["rows"]) == ["base", *TASKS, *(label for label, _, _ in MERGE_ROWS)]
    assert table["merges"]["linear"]["rank_per_module"] == [len(TASKS) * RANK]
    assert table["merges"]["lego k=8"]["rank_per_module"] == [8]
    lines = table_markdown(table).splitlines()
    assert lines[0] == "| model | " + " | ".join([*TASKS, "mean"]) + " |"
    assert len(lines) == 2 + len(table["rows"])


def test_build_smoke_refuses_the_shipped_assets():
    run = subprocess.run(
        [sys.executable, "scripts/build_zoo.py", "--smoke", "--out", str(ZOO_DIR)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 2 and "never writes into the shipped assets" in run.stderr


@pytest.mark.parametrize("which", ["base", "--adapter", "--merged"])
def test_zoo_eval_cli_json(smoke_zoo, which):
    args = [] if which == "base" else [which, str(smoke_zoo / "adapters" / "count")]
    run = subprocess.run(
        [sys.executable, "-m", "lego_viz", "zoo-eval", *args, "--zoo", str(smoke_zoo), "--n", "2", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    scores = json.loads(run.stdout)
    assert list(scores) == [*TASKS, "mean"]
    assert scores["mean"] == pytest.approx(sum(scores[name] for name in TASKS) / len(TASKS))


@pytest.mark.parametrize("args", [["--n", "0"], ["--tasks", "nope"], ["--adapter", "/nonexistent"]])
def test_zoo_eval_cli_bad_input_exits_2(smoke_zoo, args):
    run = subprocess.run(
        [sys.executable, "-m", "lego_viz", "zoo-eval", "--zoo", str(smoke_zoo), *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
