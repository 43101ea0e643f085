"""The lego merge command runs on numpy alone, for every input (issue 24, item 7).

Each command runs in a fresh process where ``import torch`` fails (a meta-path finder refuses it), on
two zoo adapters (small: exact checks) and on bf16 folders with the probe checks forced, checks on
and off, with and without ``--weights``. The export must be the library's in-memory merge bit for
bit, and the report's checks and errors must agree with the torch route's to float tolerance.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file

from lego_viz.adapters import load_adapters
from lego_viz.checks.factored import Factored, array_relative_error, relative_error
from lego_viz.checks.invariance import (
    check_concat_sum,
    check_concat_sum_arrays,
    check_permutation,
    check_permutation_arrays,
)
from lego_viz.export.folder import reconstruction_errors
from lego_viz.merge import merge

ROOT = Path(__file__).resolve().parent.parent
ZOO = [str(ROOT / "assets" / "zoo" / "adapters" / name) for name in ("reverse", "sort")]

# Runs the command with torch refused; EXACT_BUDGET=0 forces the probe checks (large inputs) on small ones.
BLOCKED = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import lego_viz.merge.first_pass
import lego_viz.merge.stream
if {probe}:
    lego_viz.merge.stream.EXACT_BUDGET = 0
if {alone}:  # no forked first pass (as past SUMMARY_BYTES, or where the platform cannot fork)
    lego_viz.merge.first_pass.SharedFirstPass.start = classmethod(lambda cls, adapters: None)
from lego_viz.cli.commands import main
code = main({argv!r})
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


def run_without_torch(*args: str, probe: bool = False, alone: bool = False) -> subprocess.CompletedProcess:
    script = BLOCKED.format(probe=probe, alone=alone, argv=["merge", *args])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_export_is_the_library_merge(out: Path, folders: list[str], k: int, weights: list[float] | None, **options) -> None:
    expected = merge(load_adapters(folders), "lego", k=k, weights=weights, **options)
    saved = load_file(out / "adapter_model.safetensors")
    for name, module in expected.modules.items():
        for side in "AB":
            assert torch.equal(saved[f"base_model.model.{name}.lora_{side}.weight"], getattr(module, side).to(saved[
                f"base_model.model.{name}.lora_{side}.weight"].dtype)), (name, side)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["cluster_sizes"] == expected.cluster_sizes()
    assert report["weights"] == (weights or [1.0] * len(folders))


@pytest.mark.skipif(not all(Path(p).is_dir() for p in ZOO), reason="the demo zoo's adapters are not in this checkout")
@pytest.mark.parametrize("weights", [None, [1.0, 0.5]])
@pytest.mark.parametrize("checks", ["off", "exact", "probe"])
def test_zoo_merge_runs_without_torch(tmp_path, checks, weights) -> None:
    out = tmp_path / "out"
    args = [*ZOO, "--k", "4", "--out", str(out)]
    args += ["--no-checks"] if checks == "off" else []
    args += ["--weights", ",".join(map(str, weights))] if weights else []
    done = run_without_torch(*args, probe=checks == "probe")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged 2 adapters with lego")
    assert_export_is_the_library_merge(out, ZOO, 4, weights)
    report = json.loads((out / "merge_report.json").read_text())
    if checks == "off":
        assert "invariance" not in report
        return
    adapters = load_adapters(ZOO)
    resolved = weights or [1.0, 1.0]
    for key, torch_route in (("permutation", check_permutation(adapters)), ("concat_sum", check_concat_sum(adapters, resolved))):
        found = report["invariance"][key]
        assert found["method"] == checks and found["passed"], key
        if checks == "exact":  # numpy's QR against torch's: both are float32 rounding of an exact zero
            assert found["max_rel_error"] == pytest.approx(torch_route.max_rel_error, abs=1e-6), key
            assert 0.0 < found["probe_max_rel_error"] < 1e-5, key
    errors = report["relative_error_vs_weighted_sum"]["per_module"]
    expected = reconstruction_errors(merge(adapters, "lego", k=4, weights=weights), adapters)
    assert errors == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not all(Path(p).is_dir() for p in ZOO), reason="the demo zoo's adapters are not in this checkout")
@pytest.mark.parametrize("checks", ["exact", "probe"])
def test_zoo_merge_without_a_first_pass_runs_without_torch(tmp_path, checks) -> None:
    # Each group of modules then makes its own first pass from the factors it reads.
    out = tmp_path / "out"
    done = run_without_torch(*ZOO, "--k", "4", "--weights", "2,-1", "--preset", "paper", "--out", str(out),
                             probe=checks == "probe", alone=True)
    assert done.returncode == 0, done.stderr
    assert_export_is_the_library_merge(out, ZOO, 4, [2.0, -1.0], preset="paper")
    report = json.loads((out / "merge_report.json").read_text())
    assert all(report["invariance"][key]["passed"] and report["invariance"][key]["method"] == checks
               for key in ("permutation", "concat_sum"))


@pytest.mark.skipif(not all(Path(p).is_dir() for p in ZOO), reason="the demo zoo's adapters are not in this checkout")
@pytest.mark.parametrize(("flags", "options"), [(["--preset", "paper"], {"preset": "paper"}),
                                                (["--option", "rescale=lsq"], {"rescale": "lsq"}),
                                                (["--param-reweight", "linf", "--features", "normalized"],
                                                 {"param_reweight": "linf", "features": "normalized"})])
def test_rescaled_merges_run_without_torch(tmp_path, flags, options) -> None:
    # linf and lsq rescale the centroids from the factors themselves, not from the Gram matrices
    out = tmp_path / "out"
    done = run_without_torch(*ZOO, "--k", "4", "--weights", "1,-0.5", *flags, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert_export_is_the_library_merge(out, ZOO, 4, [1.0, -0.5], **options)
    report = json.loads((out / "merge_report.json").read_text())
    assert all(report["invariance"][key]["passed"] for key in ("permutation", "concat_sum"))


@pytest.mark.skipif(not all(Path(p).is_dir() for p in ZOO), reason="the demo zoo's adapters are not in this checkout")
def test_exact_merge_scores_on_numpy_and_a_recipe_reruns_without_torch(tmp_path) -> None:
    # k = n: the merge is the weighted sum, the report's expansion cancels and the QR route answers (numpy).
    out = tmp_path / "out"
    done = run_without_torch(*ZOO, "--k", "16", "--weights", "1,-0.5", "--no-output-reweight", "--param-reweight", "none",
                             "--out", str(out))
    assert done.returncode == 0, done.stderr
    adapters = load_adapters(ZOO)
    merged = merge(adapters, "lego", k=16, weights=[1.0, -0.5], output_reweight=False, param_reweight="none")
    report = json.loads((out / "merge_report.json").read_text())
    errors = report["relative_error_vs_weighted_sum"]["per_module"]
    torch_route = reconstruction_errors(merged, adapters)
    assert max(errors.values()) < 1e-5
    assert errors == pytest.approx(torch_route, abs=1e-6)
    again = tmp_path / "again"
    done = run_without_torch("--recipe", str(out / "recipe.yaml"), "--out", str(again))
    assert done.returncode == 0, done.stderr
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def as_arrays(adapters):
    """The adapters with their factors as numpy arrays, as the merge command holds them."""
    from lego_viz.adapters import LoraAdapter, LoraModule

    return [LoraAdapter(name=a.name, source=a.source, config=a.config, modules={
        name: LoraModule(A=m.A.numpy(), B=m.B.numpy(), scale=m.scale) for name, m in a.modules.items()}) for a in adapters]


def test_array_checks_agree_with_the_tensor_checks() -> None:
    adapters = [make_adapter(n, seed=i) for i, n in enumerate("abc")]
    weights = [1.0, -0.5, 2.0]
    for numpy_route, torch_route in ((check_permutation_arrays(as_arrays(adapters)), check_permutation(adapters, exact=True)),
                                     (check_concat_sum_arrays(as_arrays(adapters), weights),
                                      check_concat_sum(adapters, weights, exact=True))):
        assert list(numpy_route.per_module) == list(torch_route.per_module)
        assert numpy_route.method == "exact" and numpy_route.passed
        for key, error in numpy_route.per_module.items():
            assert error == pytest.approx(torch_route.per_module[key], abs=1e-6), key  # float32 rounding of zero


def test_factored_relative_error_matches_the_tensor_route_and_fails_a_broken_pairing() -> None:
    module = make_adapter("a", seed=3).modules[next(iter(make_adapter("a", seed=3).modules))]
    A, B = module.A.numpy(), module.B.numpy()
    shuffled = np.random.default_rng(0).permutation(A.shape[0])
    broken = array_relative_error([(B, A, module.scale)], [(B, A[shuffled], module.scale)])  # A moved alone
    expected = relative_error(Factored(module.B, module.A, module.scale),
                              Factored(module.B, module.A[torch.from_numpy(shuffled)], module.scale))
    assert broken > 0.1 and broken == pytest.approx(expected, rel=1e-4)
    assert array_relative_error([(B, A, 1.0)], [(B, A, 1.0)]) < 1e-6
    zero = np.zeros_like(B)
    assert array_relative_error([(zero, A, 1.0)], [(zero, A, 1.0)]) == 0.0
    assert array_relative_error([(zero, A, 1.0)], [(B, A, 1.0)]) == float("inf")


LIBRARY_SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 32)}


@pytest.fixture(scope="module")
def adapter_library(tmp_path_factory) -> list[str]:
    """130 adapters r = 16 on q_proj: 2,080 units, past GRAM_UNITS, so lego clusters a sketch of the points;
    the first ten also on v_proj (160 units: the Gram route, with the command's first pass)."""
    from conftest import save_peft_folder

    root = tmp_path_factory.mktemp("library")
    q_only = dict(list(LIBRARY_SHAPES.items())[:1])
    return [str(save_peft_folder(make_adapter(f"a{i}", r=16, alpha=16, seed=i, shapes=LIBRARY_SHAPES if i < 10 else q_only),
                                 root / f"a{i:03d}")) for i in range(130)]


@pytest.mark.parametrize(("checks", "alone", "weights"), [("exact", False, None), ("probe", False, None),
                                                          ("off", True, [1.0, -0.5] * 65), ("probe", True, None)])
def test_adapter_library_merge_runs_without_torch(tmp_path, adapter_library, checks, alone, weights) -> None:
    # The sketch k-means runs on numpy on the CPU: the command's export is the library's merge bit for bit.
    out = tmp_path / "out"
    args = [*adapter_library, "--k", "16", "--out", str(out)]
    args += ["--no-checks"] if checks == "off" else []
    args += ["--weights", ",".join(map(str, weights))] if weights else []
    done = run_without_torch(*args, probe=checks == "probe", alone=alone)
    assert done.returncode == 0, done.stderr
    assert_export_is_the_library_merge(out, adapter_library, 16, weights)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["details"]["kmeans"] == {"gram (n ≤ 2048 units)": 1, "sketch (n > 2048 units)": 1}
    if checks == "off":
        return
    assert all(report["invariance"][key]["passed"] and report["invariance"][key]["method"] == checks
               for key in ("permutation", "concat_sum"))
    # The report's error against the dense update (64 × 64: cheap), in float64.
    adapters = load_adapters(adapter_library)
    merged = merge(adapters, "lego", k=16, weights=weights)
    for name, found in report["relative_error_vs_weighted_sum"]["per_module"].items():
        exact = sum(w * a.modules[name].scale * (a.modules[name].B.double() @ a.modules[name].A.double())
                    for a, w in zip(adapters, weights or [1.0] * len(adapters)) if name in a.modules)
        ours = merged.modules[name].scale * (merged.modules[name].B.double() @ merged.modules[name].A.double())
        assert found == pytest.approx(float((ours - exact).norm() / exact.norm()), rel=1e-4), name
