"""Adapters kept on disk and merged group by group (issue 15, items 1, 3, 5).

The streamed merge must give the in-memory merge's result bit for bit; the report's errors must
match the exact QR route; progress must count every module.
"""

import json

import numpy as np
import pytest
import torch
from conftest import make_adapter, save_peft_folder

from benchmarks.synthetic import ReferenceShape, make_adapters
from lego_viz.adapters import AdapterError, load_adapter, load_adapters
from lego_viz.adapters.stored import StoredLoraModule
from lego_viz.checks.factored import Factored, relative_error
from lego_viz.checks.invariance import check_concat_sum, check_permutation, probe_checks
from lego_viz.export.folder import reconstruction_errors
from lego_viz.merge import merge
from lego_viz.merge.first_pass import read_stacked, summarize
from lego_viz.merge.stream import merge_streaming, module_groups

SHAPE = ReferenceShape(n_layers=2, n_adapters=4, rank=4, shrink=32)


@pytest.fixture(scope="module")
def bf16_folders(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("bf16")
    adapters = make_adapters(SHAPE, seed=3, dtype=torch.bfloat16)
    return [str(save_peft_folder(a, tmp / a.name)) for a in adapters]


def test_lazy_modules_read_the_stored_values(bf16_folders) -> None:
    eager, lazy = load_adapter(bf16_folders[0]), load_adapter(bf16_folders[0], lazy=True)
    assert lazy.sha256 == eager.sha256 and lazy.summary() == eager.summary()
    for name, module in lazy.modules.items():
        assert isinstance(module, StoredLoraModule)
        assert module.A.dtype == torch.float32  # bf16 on disk, float32 once read
        assert torch.equal(module.A, eager.modules[name].A) and torch.equal(module.B, eager.modules[name].B)
        assert (module.r, module.d_in, module.d_out) == (eager.modules[name].r, eager.modules[name].d_in, eager.modules[name].d_out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lazy_load_finds_non_finite_values_in_half_precision(tmp_path, bad) -> None:
    adapter = make_adapter("h")
    name = next(iter(adapter.modules))
    tensors = {f"base_model.model.{m}.lora_{side}.weight": getattr(lora, side).to(torch.float16).contiguous()
               for m, lora in adapter.modules.items() for side in "AB"}
    tensors[f"base_model.model.{name}.lora_B.weight"][3, 1] = bad
    folder = save_peft_folder(adapter, tmp_path / "h", tensors=tensors)
    with pytest.raises(AdapterError, match=r"lora_B.weight has 1 NaN/inf"):
        load_adapter(folder, lazy=True)
    deferred = load_adapter(folder, lazy=True, defer_checks=True, hash_weights=False)  # what the merge command does
    assert deferred.sha256 == ""
    with pytest.raises(AdapterError, match=r"lora_B.weight has 1 NaN/inf"):
        merge_streaming([deferred], "linear")
    with pytest.raises(AdapterError, match=r"lora_B.weight has 1 NaN/inf"):  # the first pass finds it from its Gram matrices
        summarize([deferred])


@pytest.mark.parametrize(("method", "options"), [("lego", {}), ("lego", {"features": "raw", "param_reweight": "linf"}),
                                                  ("svd", {}), ("linear", {})])
def test_streamed_merge_is_bit_identical_to_in_memory(bf16_folders, method, options) -> None:
    k = None if method == "linear" else 4
    weights = [1.0, 0.5, -1.0, 2.0]
    expected = merge(load_adapters(bf16_folders), method, k=k, weights=weights, **options)
    lazy = load_adapters(bf16_folders, lazy=True, defer_checks=True, hash_weights=False)  # as the merge command loads
    assert len(module_groups(lazy, 40_000)) > 3  # small groups: many batches of k-means
    streamed = merge_streaming(lazy, method, k=k, weights=weights, group_bytes=40_000, **options).merged
    assert list(streamed.modules) == list(expected.modules)
    for name, module in expected.modules.items():
        assert torch.equal(streamed.modules[name].A, module.A), name
        assert torch.equal(streamed.modules[name].B, module.B), name
    for name, labels in expected.labels.items():
        assert torch.equal(streamed.labels[name], labels)
    assert streamed.options == expected.options and streamed.sources == expected.sources


@pytest.mark.parametrize("options", [{}, {"features": "raw", "param_reweight": "linf"}, {"rescale": "lsq"}])
@pytest.mark.parametrize(("probed", "arrays"), [(False, False), (True, False), (False, True), (True, True)])
def test_merge_from_the_first_pass_is_bit_identical_to_in_memory(bf16_folders, options, probed, arrays, monkeypatch) -> None:
    # What the merge command does: the first pass (numpy) first, then clusters without a weight read and
    # the centroids from small groups. probed: checks by probes (large inputs), all modules at once.
    # arrays: the command's torch-free route (numpy factors out) where the options allow it.
    if probed:
        monkeypatch.setattr("lego_viz.merge.stream.EXACT_BUDGET", 0)
    weights = [1.0, 0.5, -1.0, 2.0]
    expected = merge(load_adapters(bf16_folders), "lego", k=4, weights=weights, **options)
    lazy = load_adapters(bf16_folders, lazy=True, defer_checks=True, hash_weights=False)
    summaries = summarize(lazy)
    assert set(summaries) == set(expected.modules)
    result = merge_streaming(lazy, "lego", k=4, weights=weights, summaries=summaries, arrays=arrays, **options)
    on_arrays = arrays  # every reweighting and lsq: the centroids are numpy in both routes
    for name, module in expected.modules.items():
        merged = result.merged.modules[name]
        assert isinstance(merged.A, np.ndarray) == on_arrays and isinstance(result.merged.labels[name], np.ndarray) == on_arrays
        assert torch.equal(torch.as_tensor(merged.A), module.A), name
        assert torch.equal(torch.as_tensor(merged.B), module.B), name
        assert torch.equal(torch.as_tensor(result.merged.labels[name]), expected.labels[name])
    assert result.errors == pytest.approx(reconstruction_errors(expected, load_adapters(bf16_folders)), rel=1e-12)
    assert result.merged.details == expected.details
    for key, check in ((key, result.checks[key]) for key in ("permutation", "concat_sum")):
        assert check.passed and check.method == ("probe" if probed else "exact"), key
        reference = check_permutation(load_adapters(bf16_folders)) if key == "permutation" else check_concat_sum(load_adapters(bf16_folders))
        assert list(check.per_module) == list(reference.per_module)


@pytest.mark.parametrize("options", [{}, {"param_reweight": "linf"}, {"rescale": "lsq"}])
def test_arrays_without_a_first_pass_are_bit_identical_to_in_memory(bf16_folders, options) -> None:
    # The merge command without its forked first pass: each group clusters its own modules on numpy.
    weights = [1.0, 0.5, -1.0, 2.0]
    expected = merge(load_adapters(bf16_folders), "lego", k=4, weights=weights, **options)
    lazy = load_adapters(bf16_folders, lazy=True, defer_checks=True, hash_weights=False)
    result = merge_streaming(lazy, "lego", k=4, weights=weights, group_bytes=40_000, arrays=True, **options)
    for name, module in expected.modules.items():
        merged = result.merged.modules[name]
        assert isinstance(merged.A, np.ndarray) and isinstance(result.merged.labels[name], np.ndarray)
        assert torch.equal(torch.from_numpy(merged.A), module.A) and torch.equal(torch.from_numpy(merged.B), module.B), name
    assert result.merged.details == expected.details
    assert result.errors == pytest.approx(reconstruction_errors(expected, load_adapters(bf16_folders)), rel=1e-12)
    assert all(check.passed and check.method == "exact" for check in result.checks.values()) and len(result.checks) == 2


def test_read_stacked_puts_each_adapter_in_its_block(bf16_folders) -> None:
    eager = load_adapters(bf16_folders)
    lazy = load_adapters(bf16_folders, lazy=True)
    name = next(iter(eager[0].modules))
    A, B, blocks = read_stacked(lazy, name)
    assert A.shape[0] == B.shape[1] == sum(a.modules[name].r for a in eager)
    for t, _, units in blocks:
        assert torch.equal(torch.from_numpy(A[units]), eager[t].modules[name].A)
        assert torch.equal(torch.from_numpy(B[:, units].copy()), eager[t].modules[name].B)


@pytest.mark.parametrize("span", [False, True])
def test_probe_checks_agree_with_the_checks_and_see_a_broken_pairing(bf16_folders, span) -> None:
    adapters = load_adapters(bf16_folders)
    weights = [1.0, 0.5, -1.0, 2.0]
    # span: the probes a lego merge hands over, made from its Gram matrices (no pass over the weights)
    probes = None
    if span:
        from lego_viz.merge import plan
        from lego_viz.merge.lego import lego_clusters

        steps = plan(adapters, "lego", 4, weights, False, {})
        probes = lego_clusters(adapters, steps.weights, steps.ranks, steps.options).unit_probes
    permutation, concat = probe_checks(adapters, weights, unit_probes=probes)
    assert permutation.passed and concat.passed and permutation.max_rel_error < 1e-6 and concat.max_rel_error < 1e-6
    assert set(permutation.per_module) == set(check_permutation(adapters).per_module)
    assert set(concat.per_module) == set(check_concat_sum(adapters, weights).per_module)
    if not span:  # the same probes and permutation draws as the one-sided check functions' probe mode
        expected = check_permutation(adapters, exact=False)
        for key, error in permutation.per_module.items():
            assert error == pytest.approx(expected.per_module[key], abs=1e-6)
    broken, _ = probe_checks(adapters, weights, shuffle="a_only", unit_probes=probes)
    assert not broken.passed and broken.max_rel_error > 0.1


def test_streamed_checks_errors_and_progress(bf16_folders) -> None:
    adapters = load_adapters(bf16_folders)
    calls = []
    result = merge_streaming(load_adapters(bf16_folders, lazy=True), "lego", k=4, group_bytes=40_000,
                             progress=lambda done, total: calls.append((done, total)))
    n_modules = len(result.merged.modules)
    assert calls[-1] == (n_modules, n_modules) and [d for d, _ in calls] == sorted({d for d, _ in calls})
    whole_perm, whole_concat = check_permutation(adapters), check_concat_sum(adapters)
    assert set(result.checks["permutation"].per_module) == set(whole_perm.per_module)
    assert set(result.checks["concat_sum"].per_module) == set(whole_concat.per_module)
    assert result.checks["permutation"].passed and result.checks["concat_sum"].passed
    in_memory = reconstruction_errors(result.merged, adapters)
    for name, error in result.errors.items():
        assert error == pytest.approx(in_memory[name], rel=1e-9)  # same formula, same tensors
        parts = [Factored.of(a.modules[name]) for a in adapters]
        exact = relative_error(Factored.concat(parts), Factored.of(result.merged.modules[name]))
        assert error == pytest.approx(exact, rel=1e-4)  # the issue's bar for the report


@pytest.mark.parametrize("k", [2, 8])  # 8 = n: the exact case, where expanding the square would cancel
def test_report_errors_match_dense_float64(k) -> None:
    adapters = [make_adapter(n, seed=i) for i, n in enumerate("ab")]
    merged = merge(adapters, "lego", k=k, output_reweight=False, param_reweight="none")
    errors = reconstruction_errors(merged, adapters)
    for name, module in merged.modules.items():
        reference = sum(a.modules[name].delta_weight().double() for a in adapters)
        dense = float((reference - module.delta_weight().double()).norm() / reference.norm())
        assert errors[name] == pytest.approx(dense, rel=1e-4, abs=1e-6)


def test_sketch_kmeans_finds_separated_clusters() -> None:
    from lego_viz.units.kmeans import sketch_kmeans

    gen = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(5, 300, generator=gen)
    truth = torch.arange(400) % 5
    points = centres[truth] + torch.randn(400, 300, generator=gen)
    labels, inertia = sketch_kmeans(points, 5, n_init=4, generator=torch.Generator().manual_seed(1), sketch_dim=32)
    # Same partition up to relabelling: each true cluster maps to exactly one found cluster.
    pairs = {(int(t), int(f)) for t, f in zip(truth, labels)}
    assert len(pairs) == 5 and len({f for _, f in pairs}) == 5
    expected = sum(float((points[truth == j] - points[truth == j].mean(0)).square().sum()) for j in range(5))
    assert inertia == pytest.approx(expected, rel=1e-4)


def test_lego_switches_to_the_sketch_for_many_units(monkeypatch) -> None:
    import lego_viz.merge.lego as lego_module

    adapters = [make_adapter(n, seed=i) for i, n in enumerate("abc")]  # n = 12 units per module
    gram = merge(adapters, "lego", k=3)
    monkeypatch.setattr(lego_module, "GRAM_UNITS", 8)
    sketched = merge(adapters, "lego", k=3)
    n_modules = len(gram.modules)
    assert gram.details["kmeans"] == {"gram (n ≤ 2048 units)": n_modules, "sketch (n > 2048 units)": 0}
    assert sketched.details["kmeans"] == {"gram (n ≤ 8 units)": 0, "sketch (n > 8 units)": n_modules}
    for name, module in sketched.modules.items():
        assert module.A.shape == gram.modules[name].A.shape and torch.isfinite(module.A).all()
        assert sorted(set(sketched.labels[name].tolist())) == [0, 1, 2]
    # Permuting an adapter's ranks changes no merged update: the sketch's canonical order comes from the factors.
    from lego_viz.adapters import LoraAdapter, LoraModule

    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    shuffled = [LoraAdapter(name=a.name, source=a.source, config=a.config, modules={
        name: LoraModule(A=m.A[perm], B=m.B[:, perm], scale=m.scale) for name, m in a.modules.items()}) for a in adapters]
    again = merge(shuffled, "lego", k=3)
    for name, module in sketched.modules.items():
        # float32 products in another order: 1e-5 relative
        assert torch.allclose(again.modules[name].B @ again.modules[name].A, module.B @ module.A, rtol=1e-4, atol=1e-6), name
    # On a GPU the torch sketch k-means runs instead (here on the CPU's torch): k clusters too, other draws.
    monkeypatch.setattr(lego_module, "_sketch_device", lambda choice: "torch")
    on_torch = merge(adapters, "lego", k=3, device="cpu")
    for name, module in on_torch.modules.items():
        assert module.A.shape == gram.modules[name].A.shape and torch.isfinite(module.A).all()
        assert sorted(set(on_torch.labels[name].tolist())) == [0, 1, 2]


@pytest.mark.parametrize("checks", ["--no-checks", "probe"])
def test_merge_command_runs_lego_without_torch(bf16_folders, tmp_path, checks) -> None:
    # torch's import costs the command more than the merge: the lego route must not import it, with the
    # checks off or by probes (large inputs; forced here), and its export must be the library's, bit for bit.
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = [*bf16_folders, "--k", "4", "--out", str(out), *(["--no-checks"] if checks == "--no-checks" else [])]
    script = ("import sys; import lego_viz.merge.stream; lego_viz.merge.stream.EXACT_BUDGET = 0; from lego_viz.cli.commands import main; "
              f"code = main({['merge', *args]!r}); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = merge(load_adapters(bf16_folders), "lego", k=4)
    saved = load_file(out / "adapter_model.safetensors")
    for name, module in expected.modules.items():
        for side in "AB":
            assert torch.equal(saved[f"base_model.model.{name}.lora_{side}.weight"], getattr(module, side).bfloat16()), name
    report = json.loads((out / "merge_report.json").read_text())
    assert report["cluster_sizes"] == expected.cluster_sizes()
    assert ("invariance" in report) == (checks == "probe")
    if checks == "probe":
        assert all(report["invariance"][key]["passed"] and report["invariance"][key]["method"] == "probe"
                   for key in ("permutation", "concat_sum"))


def test_merge_command_in_a_fresh_process_matches_the_library(bf16_folders, tmp_path) -> None:
    # A fresh `python -m lego_viz merge` makes the first pass in a forked process while it imports torch,
    # then leaves without Python's teardown: the export must be the in-memory merge, complete.
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lego_viz", "merge", *bf16_folders, "--k", "4", "--dtype", "fp32",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged 4 adapters with lego")
    expected = merge(load_adapters(bf16_folders), "lego", k=4)
    saved = load_file(out / "adapter_model.safetensors")
    for name, module in expected.modules.items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], module.A), name
        assert torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], module.B), name
    assert (out / "merge_report.json").read_text().rstrip().endswith("}")


def test_merge_command_reports_a_non_finite_value_found_by_the_first_pass(tmp_path) -> None:
    import subprocess
    import sys

    adapters = [make_adapter(name, seed=i) for i, name in enumerate("ab")]
    folders = [str(save_peft_folder(a, tmp_path / a.name)) for a in adapters]
    name = next(iter(adapters[1].modules))
    tensors = {f"base_model.model.{m}.lora_{side}.weight": getattr(lora, side).clone()
               for m, lora in adapters[1].modules.items() for side in "AB"}
    tensors[f"base_model.model.{name}.lora_A.weight"][0, 2] = float("nan")
    folders[1] = str(save_peft_folder(adapters[1], tmp_path / "bad", tensors=tensors))
    done = subprocess.run([sys.executable, "-m", "lego_viz", "merge", *folders, "--k", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "lora_A.weight has 1 NaN/inf" in done.stderr and not (tmp_path / "out").exists()


_SHARED_PASS = """
import sys
import numpy as np
from lego_viz.adapters import load_adapters
from lego_viz.merge.first_pass import SharedFirstPass, summarize

folders, kill = sys.argv[2:], sys.argv[1] == "kill"
lazy = load_adapters(folders, lazy=True, defer_checks=True, hash_weights=False)
shared = SharedFirstPass.start(lazy)
assert shared is not None, "no fork"
if kill:  # the forked process dies at once: this one must do every module itself
    shared.process.kill()
found, expected = shared.result(), summarize(lazy)
assert list(found) == list(expected), (list(found), list(expected))
for name, summary in expected.items():
    for field in ("gram_a", "gram_b", "row_max", "row_min"):
        assert np.array_equal(getattr(found[name], field), getattr(summary, field)), (name, field)
assert "torch" not in sys.modules
print("ok", len(found))
"""


@pytest.mark.parametrize("kill", [False, True])
def test_shared_first_pass_equals_summarize(bf16_folders, kill) -> None:
    # Two processes share the first pass (the merge command's: a forked one starts while the parent imports
    # torch); in a fresh interpreter, since a process with torch loaded does not fork for it.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SHARED_PASS, "kill" if kill else "run", *bf16_folders],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
