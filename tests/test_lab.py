"""The merge lab: the random-LoRA control, Wilson intervals, the scoring harness and the experiments' bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_adapter

from lego_viz.adapters.control import random_like
from lego_viz.merge import MERGE_METHODS, merge
from lego_viz.zoo import lab
from lego_viz.zoo.harness import Scorer, Tally, TaskScore, pooled, wilson_interval
from lego_viz.zoo.model import ZOO_DIR, adapter_dirs

ZOO_BUILT = (ZOO_DIR / "base" / "config.json").is_file() and bool(adapter_dirs())
needs_zoo = pytest.mark.skipif(not ZOO_BUILT, reason="assets/zoo not built (run scripts/build_zoo.py)")

# ----------------------------------------------------------------------------- random control


@pytest.fixture
def adapter():
    return make_adapter("reverse", r=4, seed=3)


def test_control_keeps_shapes_scale_and_every_unit_norm(adapter):
    control = random_like(adapter, seed=0)
    assert control.name == "random_reverse" and control.config == adapter.config
    assert control.modules.keys() == adapter.modules.keys()
    for name, lora in adapter.modules.items():
        twin = control.modules[name]
        assert twin.A.shape == lora.A.shape and twin.B.shape == lora.B.shape and twin.scale == lora.scale
        # float32 rounding of a unit vector times its norm: a few ulps.
        torch.testing.assert_close(twin.A.norm(dim=1), lora.A.norm(dim=1), rtol=1e-6, atol=0)
        torch.testing.assert_close(twin.B.norm(dim=0), lora.B.norm(dim=0), rtol=1e-6, atol=0)


def test_control_directions_are_random(adapter):
    control = random_like(adapter, seed=0)
    for name, lora in adapter.modules.items():
        twin = control.modules[name]
        cos_a = torch.nn.functional.cosine_similarity(twin.A, lora.A, dim=1).abs()
        cos_b = torch.nn.functional.cosine_similarity(twin.B, lora.B, dim=0).abs()
        # Independent directions in ≥ 16 dimensions: |cos| ≈ 1/sqrt(d) ≈ 0.2; 0.9 would be a copy.
        assert cos_a.max() < 0.9 and cos_b.max() < 0.9
        assert not torch.allclose(twin.B @ twin.A, lora.B @ lora.A, atol=1e-3)


def test_control_is_deterministic_by_seed_and_differs_between_adapters(adapter):
    first, again, other = random_like(adapter, seed=5), random_like(adapter, seed=5), random_like(adapter, seed=6)
    sibling = random_like(make_adapter("sort", r=4, seed=3), seed=5)  # same tensors, another name
    name = next(iter(adapter.modules))
    assert torch.equal(first.modules[name].A, again.modules[name].A) and torch.equal(first.modules[name].B, again.modules[name].B)
    assert not torch.equal(first.modules[name].A, other.modules[name].A)
    assert not torch.equal(first.modules[name].A, sibling.modules[name].A)


def test_control_keeps_zero_units_zero(adapter):
    name = next(iter(adapter.modules))
    lora = adapter.modules[name]
    B = lora.B.clone()
    B[:, 1] = 0  # an untrained unit
    adapter.modules[name] = type(lora)(A=lora.A, B=B, scale=lora.scale)
    twin = random_like(adapter).modules[name]
    assert torch.count_nonzero(twin.B[:, 1]) == 0 and torch.count_nonzero(twin.B[:, 0]) > 0


# ----------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # By hand: p = 0.8, z² = 3.8415; centre = (0.8 + z²/20) / (1 + z²/10) = 0.71674,
        # half = z·sqrt(0.016 + z²/400) / (1 + z²/10) = 0.22658.
        (8, 10, 0.49016, 0.94332),
        (0, 10, 0.0, 0.27753),  # z² / (n + z²)
        (10, 10, 0.72247, 1.0),
        (100, 200, 0.43136, 0.56864),  # p = 0.5: centre 0.5, half = z·sqrt(1/800 + z²/160000) / (1 + z²/200)
    ],
)
def test_wilson_interval_against_hand_computed_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=1e-5)


def test_wilson_interval_rejects_impossible_counts():
    for correct, n in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="correct"):
            wilson_interval(correct, n)


def test_pooled_counts_every_prompt():
    scores = [TaskScore("a", (True, False, True, True)), TaskScore("b", (False,) * 4)]
    assert pooled(scores) == Tally(3, 8) and pooled(scores).accuracy == 3 / 8


# ----------------------------------------------------------------------------- harness on the shipped zoo


@pytest.fixture(scope="module")
def zoo():
    from lego_viz.adapters import load_adapter
    from lego_viz.zoo.model import load_base

    base, tokenizer = load_base(device="cpu")
    adapters = {name: load_adapter(path, name=name) for name, path in adapter_dirs().items()}
    return base, tokenizer, adapters


@needs_zoo
def test_linear_merge_of_one_adapter_scores_exactly_as_the_adapter(zoo):
    from lego_viz.zoo.evaluate import task_hits
    from lego_viz.zoo.model import load_adapted

    base, tokenizer, adapters = zoo
    name = next(iter(adapters))
    scorer = Scorer.from_model(base, tokenizer, n=12)
    merged = scorer.score(merge([adapters[name]], "linear"), [name])[name]
    model, _ = load_adapted(adapter_dirs()[name], device="cpu")
    assert merged.hits == tuple(task_hits(model, tokenizer, name, 12))  # prompt by prompt
    assert merged.tally.accuracy > 0.5  # the adapter solves its task, so the comparison means something


@needs_zoo
def test_routing_one_adapter_to_itself_scores_exactly_as_the_adapter(zoo):
    from lego_viz.models.arrow import arrow_routing

    base, tokenizer, adapters = zoo
    name = next(iter(adapters))
    scorer = Scorer.from_model(base, tokenizer, n=12)
    static = scorer.score(merge([adapters[name]], "linear"), [name])[name]
    before = scorer.decoded  # the static score may come from the process-wide cache
    routed = scorer.score(arrow_routing([adapters[name]], 1, "adapter"), [name])[name]
    assert routed.hits == static.hits and scorer.decoded == before + 1  # hooks vs a PEFT export, prompt by prompt
    assert scorer.score(None, [name])[name].hits != static.hits  # the hooks were removed: the base differs


@needs_zoo
def test_scores_are_cached_by_content(zoo):
    base, tokenizer, adapters = zoo
    first, second = list(adapters.values())[:2]
    scorer = Scorer.from_model(base, tokenizer, n=3)
    tasks = [first.name]
    one = scorer.score(merge([first, second], "svd", k=3), tasks)
    again = scorer.score(merge([first, second], "svd", k=3), tasks)  # a new object, the same tensors
    assert again == one and scorer.decoded == 1
    scorer.score(merge([first, second], "svd", k=2), tasks)
    assert scorer.decoded == 2
    with pytest.raises(ValueError, match="unknown zoo task"):
        scorer.score(None, ["juggle"])
    with pytest.raises(ValueError, match="n must be"):
        Scorer.from_model(base, tokenizer, n=0)


# ----------------------------------------------------------------------------- experiments, with a scorer that needs no model


class RuleScorer:
    """Scores without a model: an adapter alone solves every prompt; a merge of m adapters n − m + 1 of n;
    a merge of random controls none. Enough to check the lab's bookkeeping exactly."""

    n = 6

    def score(self, merged, tasks):
        sources = [s["name"] for s in merged.sources] if merged is not None else []
        if merged is None or sources[0].startswith("random_"):
            correct = 0
        else:
            correct = self.n - len(sources) + 1
        return {t: TaskScore(t, (True,) * correct + (False,) * (self.n - correct)) for t in tasks}


def _zoo_like(ranks=(4, 4, 4, 4)):
    return [make_adapter(task, r=r, seed=i) for i, (task, r) in enumerate(zip(("reverse", "sort", "caesar", "double"), ranks))]


def test_table_has_every_method_at_both_ranks_beside_its_control():
    adapters = _zoo_like()
    table = lab.accuracy_table(adapters, RuleScorer())
    assert table.ks == [4, 8] and not table.refused
    labels = [row.label for row in table.rows]
    expected = ["base", "each adapter alone", "linear (exact)"]
    expected += [f"{v.name} k=4" for v in lab.variants() if v.takes_k] + ["arrow (units, top-4)"]
    expected += [v.name for v in lab.variants() if not v.takes_k] + ["arrow (adapter, top-1)", "arrow (adapter, top-2)"]
    expected += [f"{v.name} k=8" for v in lab.variants() if v.takes_k] + ["arrow (units, top-8)"]
    assert labels == expected
    routed = {row.label: row for row in table.rows if row.method == "arrow"}
    assert routed["arrow (units, top-8)"].rank == "8 of 16 units" and routed["arrow (adapter, top-2)"].rank == "top-2 of 4 adapters"
    assert routed["arrow (adapter, top-1)"].options == {"granularity": "adapter", "top_k": 1}
    merged_rows = table.rows[2:]
    assert all(row.mean.accuracy == pytest.approx(3 / 6) for row in merged_rows)  # 4 adapters: 6 − 4 + 1 of 6
    assert all(row.margin == pytest.approx(3 / 6) for row in merged_rows)  # controls score 0
    as_dict = table.to_dict()
    assert as_dict["rows"][2]["retention"] == pytest.approx(0.5) and as_dict["rows"][2]["control"]["mean"]["correct"] == 0
    header, rows = lab.table_cells(as_dict)
    # 12 of 24 prompts: half-width z·sqrt(1/96 + z²/2304) / (1 + z²/24) = 0.1857.
    assert header[2:6] == list(lab.TABLE_HEADER_TAIL) and rows[2][5] == "+50.0" and rows[2][2] == "50.0 (31.4–68.6)"


def test_table_lists_a_refusing_method_once_with_its_reason():
    table = lab.accuracy_table(_zoo_like((4, 2, 4, 4)), RuleScorer())
    equal_only = [m for m, spec in MERGE_METHODS.items() if spec.equal_ranks]
    assert equal_only and set(equal_only) <= set(table.refused)
    assert all("equal ranks" in table.refused[m] for m in equal_only)
    assert not {row.method for row in table.rows} & set(equal_only)


def test_subsets_are_seeded_distinct_and_complete_when_few():
    names = ["a", "b", "c", "d", "e"]
    drawn = lab.subsets(names, [2, 4, 5], per_size=3, seed=1)
    assert [len(drawn[s]) for s in (2, 4, 5)] == [3, 3, 1]
    assert all(len(set(group)) == size and len(set(drawn[size])) == len(drawn[size]) for size in drawn for group in drawn[size])
    assert drawn == lab.subsets(names, [2, 4, 5], per_size=3, seed=1)
    assert drawn[2] != lab.subsets(names, [2], per_size=3, seed=2)[2] or drawn[4] != lab.subsets(names, [4], per_size=3, seed=2)[4]
    with pytest.raises(ValueError, match="out of range"):
        lab.subsets(names, [6], per_size=1)


def test_retention_curve_shapes():
    curve = lab.retention_curve(_zoo_like(), RuleScorer(), per_size=2)
    assert set(curve["methods"]) == {"linear", *(v.name for v in lab.variants())}
    assert {size: len(groups) for size, groups in curve["subsets"].items()} == {"2": 2, "3": 2, "4": 1}
    for series in curve["methods"].values():
        assert series["sizes"] == [2, 3, 4]
        assert [len(runs) for runs in series["runs"]] == [2, 2, 1]
        assert series["mean"] == pytest.approx([(6 - m + 1) / 6 for m in (2, 3, 4)]) and series["sd"] == [0.0] * 3
    header, rows = lab.curve_cells(curve)
    assert header == ["method", "2 adapters", "3 adapters", "4 adapters"] and rows[0][1] == "83.3 ± 0.0"


def test_k_sweep_covers_every_method_that_takes_k():
    sweep = lab.k_sweep(_zoo_like(), RuleScorer())
    assert sweep["ks"] == [1, 2, 4, 8, 16]  # 4 adapters × r = 4: 16 units per module
    assert set(sweep["methods"]) == {v.name for v in lab.variants() if v.takes_k}
    for series in sweep["methods"].values():
        assert len(series["k"]) == len(series["accuracy"]) == len(series["error"]) == 5
        assert all(low <= acc <= high for low, acc, high in zip(series["low"], series["accuracy"], series["high"]))
    assert sweep["methods"]["svd"]["error"][-1] < 1e-4  # svd at k = all units is the exact sum


def test_lab_keeps_zoo_task_adapters_only():
    kept, left_out = lab.lab_adapters([make_adapter("reverse"), make_adapter("upload"), make_adapter("reverse")])
    assert [a.name for a in kept] == ["reverse"] and left_out == ["upload", "reverse"]
    with pytest.raises(ValueError, match="zoo task adapters"):
        lab.lab_adapters([make_adapter("upload")])


def test_variants_follow_the_registry(monkeypatch):
    names = [v.name for v in lab.variants()]
    assert "linear" not in names and all(m in names for m in MERGE_METHODS if m != "linear")
    # An extra variant whose option the registry lacks is skipped, not an error.
    monkeypatch.setitem(lab.EXTRA_VARIANTS, "svd", (("bogus", {"no_such_option": 1}),))
    assert "svd (bogus)" not in [v.name for v in lab.variants()]


@needs_zoo
def test_shipped_measurement_is_of_the_shipped_adapters():
    results = lab.shipped_results()
    if not (ZOO_DIR / lab.SHIPPED_JSON).is_file():
        pytest.skip("no merge_lab.json yet (python scripts/merge_lab_table.py)")
    assert results is not None, "assets/zoo/merge_lab.json was measured on other adapters: rerun scripts/merge_lab_table.py"
    assert {"table", "retention_curve", "k_sweep"} <= set(results) and all(math.isfinite(s) for s in results["seconds"].values())
    assert {row["label"] for row in results["table"]["rows"]} | set(results["table"]["refused"]) >= {"linear (exact)", "base"}
