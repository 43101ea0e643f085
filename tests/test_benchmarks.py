"""Tests of benchmarks/: the fast paths against their slow references on small shapes, and the --quick runs.

No wall-clock assertions: timings are only checked to be measured (positive, finite).
"""

import math
import re

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from benchmarks import bench_lego, bench_svd, run
from benchmarks.bench_memory import PeakRss
from benchmarks.report import Row, markdown
from benchmarks.synthetic import ReferenceShape, adapter_bytes, make_adapters
from lego_viz.checks.factored import Factored, factored_norm, gram_norm, relative_error
from lego_viz.merge import merge

TINY = ReferenceShape(n_layers=1, n_adapters=3, rank=4, shrink=32)


def test_synthetic_adapters_are_seeded_and_shaped() -> None:
    first, again, other = (
        make_adapters(TINY, seed=1),
        make_adapters(TINY, seed=1),
        make_adapters(TINY, seed=2),
    )
    assert len(first) == 3 and len(first[0].modules) == 7
    q = first[0].modules["model.layers.0.self_attn.q_proj"]
    assert q.A.shape == (4, 128) and q.B.shape == (128, 4) and q.scale == pytest.approx(32.0 / 4)
    down = first[0].modules["model.layers.0.mlp.down_proj"]
    assert (down.d_in, down.d_out) == (14336 // 32, 4096 // 32)
    assert torch.equal(q.A, again[0].modules["model.layers.0.self_attn.q_proj"].A)
    assert not torch.equal(q.A, other[0].modules["model.layers.0.self_attn.q_proj"].A)
    assert adapter_bytes(first) == 3 * 4 * 4 * sum(d_in + d_out for _, d_in, d_out in TINY.linears)


def test_synthetic_half_precision() -> None:
    adapters = make_adapters(TINY, dtype=torch.bfloat16)
    assert adapters[0].modules["model.layers.0.mlp.up_proj"].A.dtype == torch.bfloat16
    assert adapter_bytes(adapters) * 2 == adapter_bytes(make_adapters(TINY))


@pytest.mark.parametrize("bad", [{"n_layers": 0}, {"shrink": 3}, {"noise": -1.0}])
def test_reference_shape_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match="must"):
        ReferenceShape(**bad)


def test_lego_inertia_matches_sklearn_loop_on_small_shape() -> None:
    adapters = make_adapters(ReferenceShape(n_layers=1, shrink=16))
    merged = merge(adapters, "lego", k=bench_lego.K, n_init=bench_lego.N_INIT, features=bench_lego.FEATURES)
    _, sk_inertia, ours = bench_lego.sklearn_loop(adapters, merged.labels)
    assert set(ours) == set(merged.modules)
    # Seeded, so deterministic; the bar is 1% on the total.
    assert sum(ours.values()) <= 1.01 * sum(sk_inertia.values())


def test_labels_inertia_matches_sklearn_definition() -> None:
    x = np.random.default_rng(0).standard_normal((60, 5))
    km = KMeans(4, n_init=3, random_state=0).fit(x)
    # sklearn's inertia_ uses its last centres; with converged labels those are the cluster means.
    assert bench_lego.labels_inertia(x, km.labels_) == pytest.approx(km.inertia_, rel=1e-9)


def test_factored_svd_matches_peft() -> None:
    peft_time, ours_time, difference, n_modules = bench_svd.compare(
        ReferenceShape(n_layers=1, shrink=32), repeats=1
    )
    assert n_modules == 7
    assert difference <= bench_svd.DIFFERENCE_TARGET  # float32 SVDs of a 448×128 update: ~1e-6 observed
    assert peft_time > 0 and ours_time > 0


@pytest.mark.parametrize(("d_out", "n", "d_in"), [(40, 6, 30), (64, 24, 17)])
def test_gram_and_factored_norms_match_dense(d_out: int, n: int, d_in: int) -> None:
    gen = torch.Generator().manual_seed(d_out)
    f = Factored(torch.randn(d_out, n, generator=gen), torch.randn(n, d_in, generator=gen))
    dense = float(torch.linalg.matrix_norm((f.B @ f.A).double()))
    assert gram_norm(f) == pytest.approx(dense, rel=1e-6)  # float64 Grams of float32 factors
    assert factored_norm(f) == pytest.approx(dense, rel=1e-5)  # float32 QR
    g = Factored(f.B + 0.01 * torch.randn(d_out, n, generator=gen), f.A)
    dense_rel = float(torch.linalg.matrix_norm((f.B @ f.A - g.B @ g.A).double())) / dense
    assert relative_error(f, g) == pytest.approx(dense_rel, rel=1e-4)


def test_peak_rss_sees_an_allocation() -> None:
    # Earlier tests can leave freed memory resident in the heap, which a new block would reuse without
    # raising the peak: hand it back first, so the block below needs fresh pages.
    from lego_viz.merge.stream import _release_freed_memory

    _release_freed_memory()
    with PeakRss() as rss:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert rss.extra >= 48 * 2**20


def test_markdown_table() -> None:
    rows = [Row("1 x", "what", "1 s", "2 s", "2×", "≥ 1×", True), Row("2 y", "other", "—", "—", "skipped")]
    text = markdown(rows)
    assert text.count("\n") == 4
    assert "| 1 x | what | 1 s | 2 s | 2× | ≥ 1× | yes |" in text
    assert text.rstrip().endswith("| 2 y | other | — | — | skipped | — | — |")


def _check_rows(rows: list[Row], item: str) -> None:
    assert rows and all(r.item.split()[1] == item for r in rows)
    for row in rows:
        if "skipped" in row.result:
            assert row.met is None
            continue
        numbers = re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", row.ours + row.result)
        assert numbers and all(math.isfinite(float(v)) for v in numbers)


@pytest.mark.slow
@pytest.mark.parametrize("item", list(run.ITEMS))
def test_quick_run(item: str) -> None:
    _check_rows(run.ITEMS[item](True), item)


def test_runner_writes_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "results.md"
    rows = run.main(["--quick", "--only", "checks", "--out", str(out)])
    text = out.read_text()
    assert "Mode: quick" in text and "Machine:" in text
    assert markdown(rows) in text
    assert "| 3 checks |" in capsys.readouterr().out


def test_runner_rejects_unknown_items() -> None:
    with pytest.raises(SystemExit) as exc:
        run.main(["--quick", "--only", "lego,nope"])
    assert exc.value.code == 2
