"""Tab 1: load adapters (demo zoo, uploads, paths or hub ids) and choose which take part, with what weight."""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from lego_viz.adapters import (
    CONFIG_NAME,
    WEIGHT_NAMES,
    AdapterError,
    LoraAdapter,
    load_adapter,
    loading,
    resolve_adapter_path,
    twin_note,
)
from lego_viz.adapters.loading import zip_members
from lego_viz.adapters.stored import SafetensorsFile
from lego_viz.ui import learn, runtime
from lego_viz.ui.errors import user_errors
from lego_viz.ui.runtime import MAX_ADAPTERS, UPLOAD_TYPES, check_allowed_path
from lego_viz.ui.state import Session

HEADERS = ["adapter", "base model", "r", "α", "scale", "targets", "modules", "#MSUs", "notes"]


@dataclass
class LoadTab:
    """The components other tabs wire to."""

    zoo_button: gr.Button
    skills_button: gr.Button
    load_button: gr.Button
    clear_button: gr.Button
    files: gr.File
    paths: gr.Textbox
    replace: gr.Checkbox
    table: gr.Dataframe
    status: gr.Markdown
    use: list[gr.Checkbox]
    weights: list[gr.Slider]
    loaded: list = field(default_factory=list)  # events that load adapters (followed up by other tabs)
    selected: list = field(default_factory=list)  # events that change the selection

    @property
    def outputs(self) -> list:
        """What every load-like event updates, after the session state."""
        return [self.table, self.status, *self.use, *self.weights]


def _fmt(value) -> str:
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def adapter_rows(session: Session) -> list[list[str]]:
    """One table row per loaded adapter."""
    rows = []
    for adapter in session.adapters:
        info = adapter.summary()
        rows.append([
            info["name"], str(info["base_model"]), _fmt(info["r"]), _fmt(info["lora_alpha"]), _fmt(info["scale"]),
            ", ".join(info["targets"]), str(info["modules"]), str(info["msus"]), " ".join(adapter.warnings),
        ])
    return rows


def _view(session: Session, status: str) -> tuple:
    """The session plus every output of a load-like event, slots filled in load order."""
    n = len(session.adapters)
    use = [
        gr.update(visible=i < n, label=session.adapters[i].name if i < n else "", value=i < n and session.use[i])
        for i in range(MAX_ADAPTERS)
    ]
    weights = [
        gr.update(visible=i < n, label=f"weight · {session.adapters[i].name}" if i < n else "weight", value=session.weights[i] if i < n else 1.0)
        for i in range(MAX_ADAPTERS)
    ]
    return (session, adapter_rows(session), status, *use, *weights)


def _status(session: Session, added: Sequence[LoraAdapter]) -> str:
    total = sum(a.n_msus for a in session.adapters)
    names = ", ".join(f"`{a.name}`" for a in added)
    return f"Loaded {len(added)} adapter(s): {names}. The session holds {len(session.adapters)} adapters and {total} MSUs."


def _warn(adapters: Sequence[LoraAdapter]) -> None:
    for adapter in adapters:
        for message in adapter.warnings:
            gr.Warning(f"{adapter.name}: {message}")


@functools.lru_cache(maxsize=2)  # the demo zoo and the SmolLM2 skills
def _zoo_adapters(stamp: tuple[tuple[str, float], ...]) -> tuple[LoraAdapter, ...]:
    # Keyed by paths and mtimes, so a rebuilt zoo is re-read; the objects are never mutated.
    return tuple(load_adapter(path, name=Path(path).name) for path, _ in stamp)


def zoo_adapters() -> tuple[LoraAdapter, ...]:
    """The demo zoo's task adapters, loaded once per process."""
    from lego_viz.zoo.model import adapter_dirs

    dirs = adapter_dirs()
    if not dirs:
        raise FileNotFoundError("the demo zoo is not built (no adapters under assets/zoo); run `python scripts/build_zoo.py`")
    return _zoo_adapters(tuple((str(p), (p / "adapter_config.json").stat().st_mtime) for p in dirs.values()))


@user_errors
def load_zoo(session: Session) -> tuple:
    """Replace the session's adapters with the demo zoo."""
    adapters = zoo_adapters()
    session = session.with_adapters(adapters, replace=True)
    return _view(session, _status(session, adapters))


def skill_adapters() -> tuple[LoraAdapter, ...]:
    """The SmolLM2 skill adapters under assets/skills, loaded once per process (again when rebuilt)."""
    from lego_viz.llm.assets import BUILD_HINT, SKILLS_DIR, skill_dirs

    dirs = skill_dirs()
    if not dirs:
        raise FileNotFoundError(f"no SmolLM2 skill adapters are built (none under {SKILLS_DIR.name}/ in assets); {BUILD_HINT}")
    return _zoo_adapters(tuple((str(p), (p / "adapter_config.json").stat().st_mtime) for p in dirs.values()))


@user_errors
def load_skills(session: Session) -> tuple:
    """Replace the session's adapters with the SmolLM2 skills (their base loads in the run tab's real-base panel)."""
    adapters = skill_adapters()
    session = session.with_adapters(adapters, replace=True)
    _warn(adapters)
    return _view(session, _status(session, adapters) + " Their base, SmolLM2-135M-Instruct, runs in tab 4's real-base panel.")


def _is_local_path(spec: str) -> bool:
    try:
        return spec.startswith(("/", "\\", ".", "~")) or Path(spec).expanduser().exists()
    except OSError:  # a name too long for the file system: resolve_adapter_path says so
        return False


def _upload_folders(files: Sequence[str], workdir: Path) -> list[tuple[Path, str | None]]:
    """Unpack the uploads into ``workdir``: (adapter folder, name) per adapter, nothing read yet.

    The zips of one load may unpack to MAX_UNZIPPED_BYTES together (each entry is stopped at its
    declared size), so one request never writes more than that to disk, whatever the zips claim.
    """
    bad = [Path(f).name for f in files if Path(f).suffix.lower() not in UPLOAD_TYPES]
    if bad:
        raise AdapterError(f"cannot use {', '.join(bad)}: upload .zip files or adapter_config.json + adapter_model.safetensors/.bin")
    zips = [Path(f) for f in files if Path(f).suffix.lower() == ".zip"]
    # Checked here so the message names the upload, not its path in Gradio's cache.
    broken = [f.name for f in zips if not zipfile.is_zipfile(f)]
    if broken:
        raise AdapterError(
            f"{', '.join(broken)}: not a folder, a .zip, or a PEFT adapter file (named .zip, but damaged or another format renamed); "
            "zip the adapter's folder (adapter_config.json + adapter_model.safetensors) and upload that"
        )
    declared = sum(info.file_size for f in zips for info in zip_members(f))
    if declared > loading.MAX_UNZIPPED_BYTES:
        raise AdapterError(
            f"these {len(zips)} zips unpack to {declared / 2**20:,.0f} MiB together; one load may unpack at most "
            f"{loading.MAX_UNZIPPED_BYTES / 2**20:,.0f} MiB. Load fewer or smaller adapters at a time."
        )
    sources: list[tuple[Path, str | None]] = [(resolve_adapter_path(f, workdir), f.stem) for f in zips]
    loose = [Path(f) for f in files if Path(f).suffix.lower() != ".zip"]
    if loose:
        if [p.name for p in loose].count(CONFIG_NAME) != 1:
            raise AdapterError(
                f"loose files must be one adapter: exactly one {CONFIG_NAME} with its adapter_model.safetensors (or .bin); "
                "upload several adapters as one .zip each"
            )
        folder = workdir / "upload"
        folder.mkdir()
        for path in loose:
            shutil.copyfile(path, folder / path.name)
        sources.append((folder, "upload"))
    return sources


# Adapters users loaded into any session of this process (not the shared zoo), while a session holds them.
_HELD: weakref.WeakValueDictionary[int, LoraAdapter] = weakref.WeakValueDictionary()


def _held_bytes(adapter: LoraAdapter) -> int:
    """Memory an adapter's weights take (float32 factors, other tensors as stored); shapes only."""
    factors = sum(4 * m.r * (m.d_in + m.d_out) for m in adapter.modules.values())
    return factors + sum(int(getattr(t, "nbytes", 0)) for t in adapter.extra_tensors.values())


def _folder_bytes(folder: Path) -> int:
    """What :func:`_held_bytes` will be once the adapter in ``folder`` is loaded, from its safetensors
    header (a pickle: twice its size, bf16 made float32), before any weight is read."""
    path = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if path is None:
        return 0  # loading says what is missing
    if path.suffix != ".safetensors":
        return 2 * path.stat().st_size
    return sum(max(t.nbytes, 4 * math.prod(t.shape)) for t in SafetensorsFile(path, folder.name).tensors.values())


def _check_memory(session: Session, sources: Sequence[tuple[Path, str | None]], replace: bool) -> None:
    """Refuse a public load that would keep more weights in memory than one session, or all sessions
    together, may hold (runtime.MAX_SESSION_WEIGHT_BYTES, runtime.MAX_APP_WEIGHT_BYTES)."""
    kept = () if replace else session.adapters
    mine = sum(_folder_bytes(folder) for folder, _ in sources) + sum(_held_bytes(a) for a in kept)
    if mine > runtime.MAX_SESSION_WEIGHT_BYTES:
        raise AdapterError(
            f"these adapters would hold {mine / 2**20:,.0f} MiB of weights in memory; a session on this public app may hold "
            f"{runtime.MAX_SESSION_WEIGHT_BYTES / 2**20:,.0f} MiB. Load fewer or smaller adapters (Clear first), or run lego-viz locally."
        )
    others = sum(_held_bytes(a) for key, a in list(_HELD.items()) if not any(key == id(b) for b in session.adapters))
    if others + mine > runtime.MAX_APP_WEIGHT_BYTES:
        raise AdapterError(
            f"this app holds {others / 2**20:,.0f} MiB of other sessions' adapters, and these would add {mine / 2**20:,.0f} MiB "
            f"(the limit is {runtime.MAX_APP_WEIGHT_BYTES / 2**20:,.0f} MiB); try again later, or run lego-viz locally."
        )


def load_sources(session: Session, files: Sequence[str] | None, paths: str | None, replace: bool, public: bool) -> tuple:
    """Load uploads and typed paths / hub ids into the session (nothing changes if any one fails).

    The number of adapters is checked before anything is unpacked, and on a public app the weights'
    size before anything is read (:func:`_check_memory`).
    """
    specs = [line.strip() for line in (paths or "").splitlines() if line.strip()]
    if public and specs:
        # A public app reads neither the server's files nor whatever hub repository a visitor names.
        raise AdapterError(
            f"typed local paths and hub ids are disabled on this public app ({specs[0][:80]}); upload a .zip of "
            "the adapter folder instead, or run lego-viz locally to load paths and hub ids"
        )
    for spec in (s for s in specs if _is_local_path(s)):
        check_allowed_path(spec)
    files = list(files or [])
    if not files and not specs:
        raise AdapterError("nothing to load: upload adapter files, or type a folder path or hub id")
    uploads = sum(Path(f).suffix.lower() == ".zip" for f in files) + any(Path(f).suffix.lower() != ".zip" for f in files)
    if (0 if replace else len(session.adapters)) + uploads + len(specs) > MAX_ADAPTERS:
        raise AdapterError(f"at most {MAX_ADAPTERS} adapters per session; remove some (Clear) before adding more.")
    workdir = Path(tempfile.mkdtemp(prefix="lego_viz_upload_"))
    try:
        sources = _upload_folders(files, workdir) + [(resolve_adapter_path(s, workdir), None) for s in specs]
        if public:
            _check_memory(session, sources, bool(replace))
        # Everything is read into memory, so the extracted files can go right away.
        adapters = [load_adapter(folder, name=name) for folder, name in sources]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    kept = 0 if replace else len(session.adapters)
    session = session.with_adapters(adapters, replace=bool(replace))
    for i, adapter in enumerate(session.adapters[kept:], start=kept):
        _HELD[id(adapter)] = adapter
        if note := twin_note(session.adapters[:i], adapter):
            gr.Warning(note)
    _warn(adapters)
    return _view(session, _status(session, adapters))


@user_errors
def clear(session: Session) -> tuple:
    """Drop every adapter (and the merge) from the session."""
    return _view(Session(export_dir=session.export_dir), "No adapters loaded.")


@user_errors
def select(session: Session, *values) -> Session:
    """Store the use-checkboxes and weight sliders (first MAX_ADAPTERS values, then as many weights)."""
    return session.with_selection(values[:MAX_ADAPTERS], values[MAX_ADAPTERS:])


def build(session: gr.State, public: bool) -> LoadTab:
    """Lay out the load tab and wire its own events (cross-tab follow-ups are wired by `build_demo`)."""
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                zoo_button = gr.Button("Load demo zoo", variant="primary", elem_id="load-zoo")
                skills_button = gr.Button("Load SmolLM2 skills", variant="primary", elem_id="load-skills")
                clear_button = gr.Button("Clear", variant="secondary", elem_id="clear")
            files = gr.File(
                label="Upload PEFT adapters: one .zip per adapter, or adapter_config.json + adapter_model.safetensors",
                file_count="multiple", file_types=UPLOAD_TYPES, height=140,
            )
            # Paths and hub ids are a local-tool feature: a public app shows the box disabled, saying so.
            paths = gr.Textbox(
                label="…or local folders / hub ids, one per line" + (" (when you run lego-viz locally)" if public else ""),
                lines=2, interactive=not public,
                placeholder="disabled on this public app: upload a .zip" if public else "assets/zoo/adapters/reverse\nowner/some-lora",
            )
            with gr.Row():
                replace = gr.Checkbox(value=False, label="replace the current adapters", scale=2)
                load_button = gr.Button("Load", scale=1, elem_id="load")
            status = gr.Markdown("No adapters loaded.", elem_id="load-status")
        with gr.Column(scale=2):
            gr.Markdown(learn.LOAD)
    table = gr.Dataframe(
        headers=HEADERS, value=[], interactive=False, wrap=True, label="Loaded adapters", elem_id="adapter-table",
        column_widths=["11%", "14%", "5%", "5%", "6%", "33%", "8%", "7%", "11%"],
    )
    gr.Markdown("**Use** an adapter in the map, checks and merge, and set its **weight** `w` (its update counts as `w · ΔW`):")
    use, weights = [], []
    for row in range(0, MAX_ADAPTERS, 2):  # two adapters per row
        with gr.Row(equal_height=True):
            for i in (row, row + 1):
                use.append(gr.Checkbox(value=True, label="", visible=False, scale=1, min_width=120, elem_id=f"use-{i}"))
                weights.append(gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="weight", visible=False, scale=3, elem_id=f"weight-{i}"))
    tab = LoadTab(zoo_button, skills_button, load_button, clear_button, files, paths, replace, table, status, use, weights)
    outputs = [session, *tab.outputs]
    tab.loaded = [
        zoo_button.click(load_zoo, [session], outputs, api_name="load_zoo"),
        skills_button.click(load_skills, [session], outputs, api_name="load_skills"),
        load_button.click(load_handler(public), [session, files, paths, replace], outputs, api_name="load"),
    ]
    clear_button.click(clear, [session], outputs, api_name="clear")
    # .input / .release fire on user actions only, not when a load fills the slots.
    triggers = [c.input for c in use] + [s.release for s in weights]
    tab.selected = [t(select, [session, *use, *weights], session, api_visibility="private", trigger_mode="always_last") for t in triggers]
    return tab


def load_handler(public: bool):
    """`load_sources` bound to the app's public flag, with user-facing errors."""

    @user_errors
    def load(session: Session, files: list[str] | None, paths: str | None, replace: bool) -> tuple:
        return load_sources(session, files, paths, replace, public)

    return load
