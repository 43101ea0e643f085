"""Eight users at once: each loads a different subset of the demo zoo, clusters with its own k and
exports; every result must equal a single-user merge of the same request (no cross-talk), nothing
may fail, and the server's temp files must be gone once the sessions end (uploads are removed at
once; an export lives as long as its session, so the test ends the sessions as Gradio does)."""

from __future__ import annotations

import glob
import os
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lego_viz.adapters import load_adapters
from lego_viz.merge import merge
from lego_viz.ui import build_demo, launch_options
from lego_viz.ui.msu_map import ALL
from lego_viz.zoo import adapter_dirs

gradio_client = pytest.importorskip("gradio_client")
N_CLIENTS = 8


def _requests() -> list[tuple[list[Path], int]]:
    dirs = sorted(adapter_dirs().values())
    if len(dirs) < 3:
        pytest.skip("the demo zoo is not built (assets/zoo/adapters); run scripts/build_zoo.py")
    requests = []
    for i in range(N_CLIENTS):
        subset = [dirs[(i + j) % len(dirs)] for j in range(2 + i % 3)]  # 2-4 adapters, rotating
        requests.append((subset, 2 + i))  # k = 2..9, each client its own
    return requests


def _client_run(url: str, subset: list[Path], k: int, out: Path) -> dict[str, torch.Tensor]:
    client = gradio_client.Client(url, verbose=False)
    client.predict(None, "\n".join(map(str, subset)), True, api_name="/load")
    client.predict(ALL, "pca", "cluster", "lego", k, "canonical", "l2", True, 0, api_name="/cluster")
    archive, _, _ = client.predict(api_name="/export")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(out)
    return load_file(str(next(out.rglob("adapter_model.safetensors"))))


def _server_temp_files() -> set[str]:
    root = tempfile.gettempdir()
    return {p for pattern in ("lego_viz_*",) for p in glob.glob(os.path.join(root, pattern))}


def test_eight_clients_at_once_get_their_own_results(tmp_path):
    requests = _requests()
    before = _server_temp_files()
    demo = build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            futures = [pool.submit(_client_run, url, subset, k, tmp_path / f"c{i}") for i, (subset, k) in enumerate(requests)]
            results = [f.result(timeout=900) for f in futures]
        # End every session the way Gradio does when one expires: its state's delete callback runs.
        holder = demo.state_holder
        for session_id in list(holder.session_data):
            holder.delete_state(session_id)
    finally:
        demo.close()
    for (subset, k), tensors in zip(requests, results):
        expected = merge(load_adapters(subset), "lego", k=k)
        for name, lora in expected.modules.items():
            # the same deterministic merge as a single user's: equal to float rounding of the same ops
            assert torch.allclose(tensors[f"base_model.model.{name}.lora_A.weight"], lora.A, atol=1e-6), (subset, k, name)
            assert torch.allclose(tensors[f"base_model.model.{name}.lora_B.weight"], lora.B, atol=1e-6), (subset, k, name)
        assert all(t.shape[0] == k for n, t in tensors.items() if "lora_A" in n)
    leftover = _server_temp_files() - before
    assert not leftover, f"temp files left behind: {sorted(leftover)[:5]}"
