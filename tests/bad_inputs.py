"""A corpus of hostile and broken inputs, each with the error users must see (issue 7).

Every case builds its input in a temp folder and says how it is used: ``load`` (one adapter spec) or
``merge`` (good adapters + merge arguments). The same corpus runs through the library, the CLI and
the app; ``scripts/reliability_table.py`` prints it as the README's table.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import make_adapter, save_peft_folder
from safetensors.torch import save_file

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    kind: str  # "load": build(tmp) -> spec; "merge": build(tmp) -> (specs, merge kwargs); "config": -> a YAML path
    build: Callable[[Path], object]
    message: str  # regex the error message must match
    cli_message: str | None = None  # where the CLI's wording differs (argparse catches it first)


def _good(tmp: Path, name: str = "good", **kwargs) -> Path:
    return save_peft_folder(make_adapter(name, **kwargs), tmp / name)


def _with(tmp: Path, config: dict | None = None, tensors: dict | None = None, drop: str | None = None) -> Path:
    adapter = make_adapter("bad")
    full = {}
    for m, lora in adapter.modules.items():
        full[f"base_model.model.{m}.lora_A.weight"] = lora.A
        full[f"base_model.model.{m}.lora_B.weight"] = lora.B
    full.update(tensors or {})
    if drop:
        full.pop(drop)
    return save_peft_folder(adapter, tmp / "bad", tensors=full, config={**adapter.config, **(config or {})})


def _raw_weights(tmp: Path, data: bytes) -> Path:
    folder = _good(tmp, "raw")
    (folder / "adapter_model.safetensors").write_bytes(data)
    return folder


def _truncated(tmp: Path) -> Path:
    folder = _good(tmp, "trunc")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return folder


def _with_header(tmp: Path, edit: Callable[[dict], object], data_bytes: int | None = None) -> Path:
    """A good adapter whose safetensors header is rewritten by ``edit`` (its data cut to ``data_bytes``)."""
    folder = _good(tmp, "hdr")
    path = folder / "adapter_model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    text = edit(header)
    text = text if isinstance(text, bytes) else json.dumps(header).encode()
    data = raw[8 + length :][:data_bytes]
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return folder


def _overlapping(header: dict) -> None:
    # a tensor reads another one's bytes (of the same size); its own bytes go unread
    entries = sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])
    first = entries[0]
    size = first["data_offsets"][1] - first["data_offsets"][0]
    second = next(e for e in entries[1:] if e["data_offsets"][1] - e["data_offsets"][0] == size)
    second["data_offsets"] = list(first["data_offsets"])


def _config_text(tmp: Path, text: bytes) -> Path:
    folder = _good(tmp, "cfg")
    (folder / "adapter_config.json").write_bytes(text)
    return folder


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lego_viz_pwned",))


def _pickle_bin(tmp: Path, obj) -> Path:
    folder = _good(tmp, "pickled")
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump(obj, handle)
    return folder


def _zip(tmp: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    path = tmp / "upload.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def _symlink_zip(tmp: Path) -> Path:
    info = zipfile.ZipInfo("adapter/adapter_config.json")
    info.external_attr = (0o120777 << 16)
    return _zip(tmp, [(info, b"/etc/passwd")])


CONFIG_CAP = 64 << 10  # tests lower yaml_io.MAX_CONFIG_BYTES (512 KiB) to this
BOMB_CAP = 4 << 20  # tests lower MAX_UNZIPPED_BYTES (2 GiB) to this, so the bomb stays small and fast


def _bomb(tmp: Path) -> Path:
    # 16 MiB of zeros in a ~16 kB zip: 4x over the (lowered) cap
    return _zip(tmp, [("adapter/adapter_config.json", b"{}"), ("adapter/adapter_model.safetensors", b"\0" * (16 << 20))])


def _lying_zip(tmp: Path) -> Path:
    # the central directory says the weights unpack to 10 bytes; the data inflates to 1 MiB
    path = _zip(tmp, [("adapter/adapter_config.json", b"{}"), ("adapter/adapter_model.safetensors", b"\0" * (1 << 20))])
    raw = bytearray(path.read_bytes())
    record = raw.rindex(b"PK\x01\x02")  # the last entry's central directory record
    raw[record + 24 : record + 28] = (10).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(raw))
    return path


def _non_utf8_name(tmp: Path) -> str:
    name = os.fsdecode(b"adapter_\xff\xfe")
    folder = tmp / name
    adapter = make_adapter("x")
    save_peft_folder(adapter, folder, config={**adapter.config, "peft_type": "IA3"})
    return str(folder)


def _conv_only(tmp: Path) -> Path:
    adapter = make_adapter("conv")
    tensors = {f"{Q}.lora_A.weight": torch.randn(4, 3, 3, 3), f"{Q}.lora_B.weight": torch.randn(8, 4, 1, 1)}
    return save_peft_folder(adapter, tmp / "conv", tensors=tensors)


def _empty_weights(tmp: Path) -> Path:
    folder = _good(tmp, "empty")
    save_file({}, str(folder / "adapter_model.safetensors"))
    return folder


def _merge(tmp: Path, others: list[dict] | None = None, **kwargs):
    specs = [_good(tmp, "a", seed=1), _good(tmp, "b", seed=2, r=2, alpha=4)]
    for i, extra in enumerate(others or []):
        specs.append(_good(tmp, f"x{i}", seed=10 + i, **extra))
    return [str(s) for s in specs], kwargs


def _config(tmp: Path, text: str | bytes | None = None, **fields) -> str:
    """A merge config of two good adapters (``fields`` replace its keys), or ``text`` as the whole file."""
    if text is None:
        a, b = _good(tmp, "a", seed=1), _good(tmp, "b", seed=2)
        config = {"merge_method": "lego", "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"k": 2}}
        text = json.dumps({**config, **fields})  # JSON is YAML
    path = tmp / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _alias_bomb(tmp: Path) -> str:
    # "billion laughs": 9 aliases per level, 6 levels: 0.5 M strings from 400 bytes
    lines = ["merge_method: lego", "models: [{model: a}]", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 5)]
    return _config(tmp, text="\n".join([*lines, f"base_model: [{', '.join(['*l4'] * 9)}]", ""]))


_NARROW = {"model.layers.0.self_attn.q_proj": (32, 64)}
_OTHER_TARGET = {"model.layers.0.mlp.up_proj": (32, 48)}

CASES: list[Case] = [
    Case("corrupt-header", "safetensors header is garbage", "load",
         lambda t: _raw_weights(t, b"\xff" * 64), "corrupt or truncated"),
    Case("truncated", "safetensors file cut short", "load", _truncated, "corrupt or truncated"),
    Case("zero-bytes", "empty weights file", "load", lambda t: _raw_weights(t, b""), "corrupt or truncated"),
    Case("header-overlap", "safetensors data_offsets that overlap", "load",
         lambda t: _with_header(t, _overlapping), "corrupt or truncated.*overlaps"),
    Case("header-nested", "safetensors header nested 100,000 levels deep", "load",
         lambda t: _with_header(t, lambda h: b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         "corrupt or truncated"),
    Case("header-huge", "safetensors header of 17 MiB (valid JSON padded with spaces)", "load",
         lambda t: _with_header(t, lambda h: json.dumps(h).encode() + b" " * (17 << 20)), "corrupt or truncated.*header of"),
    Case("config-not-json", "adapter_config.json is not JSON", "load", lambda t: _config_text(t, b"{r: 8,"), "not valid JSON"),
    Case("config-list", "adapter_config.json holds a list", "load", lambda t: _config_text(t, b"[1, 2]"), "must hold a JSON object"),
    Case("config-non-utf8", "adapter_config.json is not UTF-8", "load", lambda t: _config_text(t, b'{"r": "\xff"}'), "not valid JSON"),
    Case("wrong-peft-type", "peft_type PREFIX_TUNING", "load", lambda t: _with(t, {"peft_type": "PREFIX_TUNING"}), "only LORA adapters"),
    Case("no-peft-type", "peft_type missing", "load", lambda t: _with(t, {"peft_type": None}), "only LORA adapters"),
    Case("dora", "use_dora: true", "load", lambda t: _with(t, {"use_dora": True}), "DoRA"),
    Case("r-zero", "r = 0", "load", lambda t: _with(t, {"r": 0}), "r must be a positive integer"),
    Case("r-negative", "r = -4", "load", lambda t: _with(t, {"r": -4}), "r must be a positive integer"),
    Case("r-string", "r = \"8\"", "load", lambda t: _with(t, {"r": "8"}), "r must be a positive integer"),
    Case("r-huge", "r = 10^9", "load", lambda t: _with(t, {"r": 10**9}), "implausibly large"),
    Case("alpha-zero", "lora_alpha = 0", "load", lambda t: _with(t, {"lora_alpha": 0}), "lora_alpha must be a positive number"),
    Case("alpha-negative", "lora_alpha = -16", "load", lambda t: _with(t, {"lora_alpha": -16}), "lora_alpha must be a positive number"),
    Case("r-mismatch", "config r=8, tensors r=4", "load", lambda t: _with(t, {"r": 8}), "config says r=8"),
    Case("ab-mismatch", "lora_A r=4 but lora_B r=3", "load",
         lambda t: _with(t, tensors={f"{Q}.lora_B.weight": torch.randn(32, 3)}), "same r"),
    Case("nan", "NaN in lora_A", "load",
         lambda t: _with(t, tensors={f"{Q}.lora_A.weight": torch.full((4, 32), float("nan"))}), "NaN/inf"),
    Case("inf", "inf in lora_B", "load",
         lambda t: _with(t, tensors={f"{Q}.lora_B.weight": torch.full((32, 4), float("inf"))}), "NaN/inf"),
    Case("too-large", "finite values of 3e38 in lora_A (their squares overflow float32)", "load",
         lambda t: _with(t, tensors={f"{Q}.lora_A.weight": torch.full((4, 32), 3e38)}), "values up to 3e\\+38, too large to merge"),
    Case("missing-lora-b", "lora_A without lora_B", "load", lambda t: _with(t, drop=f"{Q}.lora_B.weight"), "no matching lora_B"),
    Case("no-lora-tensors", "weights file holds no LoRA pairs", "load", _empty_weights, "holds no lora_A/lora_B"),
    Case("conv-only", "only 4-D (conv) LoRA tensors", "load", _conv_only, "holds no lora_A/lora_B"),
    Case("no-config", "folder without adapter_config.json", "load",
         lambda t: (t / "empty").mkdir() or t / "empty", "no adapter_config.json found"),
    Case("no-weights", "config without weights", "load",
         lambda t: (lambda f: ((f / "adapter_model.safetensors").unlink(), f)[1])(_good(t, "now")), "no adapter_model"),
    Case("pickle-code", ".bin whose pickle would run code", "load", lambda t: _pickle_bin(t, {"x": _Payload()}), "refused for safety"),
    Case("pickle-list", ".bin holding a list, not a state dict", "load",
         lambda t: (lambda f: (torch.save([torch.zeros(2)], f / "adapter_model.bin"), f)[1])(_pickle_bin(t, {})), "flat mapping"),
    Case("zip-traversal", "zip entry ../../evil", "load", lambda t: _zip(t, [("../../evil/adapter_config.json", b"{}")]), r"'\.\.' escape"),
    Case("zip-absolute", "zip entry /etc/cron.d/x", "load", lambda t: _zip(t, [("/etc/cron.d/adapter_config.json", b"{}")]), "absolute path"),
    Case("zip-symlink", "zip entry that is a symlink", "load", _symlink_zip, "symbolic link"),
    Case("zip-bomb", "zip that inflates past the size cap", "load", _bomb, "zip bomb"),
    Case("zip-lying-sizes", "zip whose directory says 10 bytes for 1 MiB of data", "load", _lying_zip, "damaged zip"),
    Case("zip-many-entries", "zip of 1,001 empty files", "load",
         lambda t: _zip(t, [(f"adapter/{i}", b"") for i in range(1001)]), "holds 1001 entries"),
    Case("zip-garbage", "a .zip that is not a zip", "load",
         lambda t: (t / "x.zip").write_bytes(b"PK\x03\x04garbage") and t / "x.zip", "not a folder, a .zip"),
    Case("hub-id-long", "1000-character hub id with ..", "load", lambda t: "a/" + "../" * 332 + "b", "not a valid hub id"),
    Case("non-utf8-name", "folder name that is not UTF-8 (and a bad config)", "load", _non_utf8_name, r"adapter_\\xff\\xfe"),
    Case("missing-path", "path that does not exist", "load", lambda t: str(t / "nowhere"), "no such file or folder"),
    Case("empty-spec", "empty path", "load", lambda t: "", "empty adapter path"),
    Case("base-mismatch", "adapters for gpt2 and a Llama", "merge", lambda t: _merge(t, [{"base": "gpt2"}]), "different base models"),
    Case("shape-mismatch", "same module, different d_out", "merge", lambda t: _merge(t, [{"shapes": _NARROW}]), "d_out=64 but"),
    Case("no-common-target", "adapters share no module", "merge", lambda t: _merge(t, [{"shapes": _OTHER_TARGET}]), "share no target module"),
    Case("k-zero", "k = 0", "merge", lambda t: _merge(t, k=0), "k=0 is out of range"),
    Case("k-too-big", "k larger than the number of MSUs", "merge", lambda t: _merge(t, k=7), "k=7 is out of range .* n=6"),
    Case("weights-nan", "a NaN weight", "merge", lambda t: _merge(t, weights=[float("nan"), 1.0]), "finite"),
    Case("weights-zero", "all weights zero", "merge", lambda t: _merge(t, weights=[0.0, 0.0]), "all adapter weights are zero"),
    Case("weights-count", "three weights for two adapters", "merge", lambda t: _merge(t, weights=[1.0, 1.0, 1.0]), "got 3 weights for 2 adapters"),
    Case("unknown-method", "method 'magic'", "merge", lambda t: _merge(t, method="magic"), "unknown merge method 'magic'; valid methods"),
    Case("unknown-option", "option 'feature' (typo)", "merge", lambda t: _merge(t, feature="raw"), "unknown option.*valid options",
         cli_message="unrecognized arguments: --feature"),
    Case("bad-option-value", "features='whitened'", "merge", lambda t: _merge(t, features="whitened"), "must be one of raw, canonical, normalized"),
    Case("unequal-ranks-ties", "ties on r=4 and r=2 adapters", "merge", lambda t: _merge(t, method="ties"), "equal ranks"),
    Case("no-adapters", "empty adapter list", "merge", lambda t: ([], {}), "no adapters given|at least one adapter"),
    # issue 26: regexes from files and command lines run on RE2 (linear time), which has no lookarounds
    # issue 26, smaller things: a name past the file system's limit, a bounded search, integers int() refuses
    Case("name-too-long", "a 300-character adapter name", "load", lambda t: "n" * 300, "longer than the 255 bytes"),
    Case("adapter-too-deep", "an adapter 5 folders below the one given", "load",
         lambda t: (_good(t / "1" / "2" / "3" / "4", "deep"), t)[1], "no adapter_config.json found within 3 levels"),
    Case("config-long-int-json", "adapter_config.json with r of 5,000 digits", "load",
         lambda t: _config_text(t, b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}"),
         "adapter_config.json key 'r' holds a whole number of 5000 digits"),
    Case("rank-pattern-lookaround", "rank_pattern key (?=(a|a)*c): backtracking regex", "load",
         lambda t: _with(t, {"rank_pattern": {"(?=(a|a)*c)": 2}}), r"rank_pattern key .* not a valid regular expression"),
    Case("k-pattern-lookaround", "--k pattern with a lookahead, (?=q)q_proj", "merge",
         lambda t: _merge(t, k={"(?=q)q_proj": 2}), r"k pattern .* not a valid regular expression"),
    # issue 26: only a method's declared options come from users, never the program's own arguments
    Case("option-internal", "--option checks=false (an argument of the streamed merge)", "merge",
         lambda t: _merge(t, checks=False), r"unknown option\(s\) checks .*valid options: features"),
    Case("recipe-weights-count", "old-format recipe: two adapters, weights: [1.0]", "config",
         lambda t: _config(t, text=json.dumps({"lego_viz_recipe": 1, "method": "linear", "weights": [1.0], "adapters": [
             {"path": str(_good(t, n, seed=i)), "name": n} for i, n in enumerate("ab")]})), r"one number per adapter \(2 adapters\), got 1 weights"),
    # issue 26: YAML is refused on size, depth, alias expansion and integer length before objects are built
    Case("config-alias-bomb", "config whose aliases expand to 0.5 M strings (billion laughs)", "config", _alias_bomb,
         r"key 'base_model' expands to over .* aliases \(an alias bomb\?\)"),
    Case("config-deep", "config nested 500 levels deep", "config",
         lambda t: _config(t, text="merge_method: lego\nmodels: " + "[" * 500 + "]" * 500), "nests deeper than 64 levels"),
    Case("config-huge", "config over the size cap", "config",
         lambda t: _config(t, text="merge_method: lego\n" + "# padding\n" * (CONFIG_CAP // 8)), "is larger than 64 KiB"),
    Case("config-not-a-file", "--config given a folder (a device or pipe alike)", "config", lambda t: str(t), "not a regular file"),
    Case("config-long-int", "parameters.k of 5,000 digits", "config",
         lambda t: _config(t, text="merge_method: lego\nparameters:\n  k: " + "9" * 5000), r"line 3: key 'k' holds a whole number of 5000 digits"),
    Case("config-internal-parameter", "config parameters: {errors: false}", "config",
         lambda t: _config(t, parameters={"k": 2, "errors": False}), r"parameters: unknown option\(s\) errors .*valid options"),
]


def load_case_error(case: Case, tmp: Path) -> str:
    """Run one case through the library; return the error message (fails if nothing is raised)."""
    from lego_viz.adapters import AdapterError, load_adapter, load_adapters
    from lego_viz.merge import merge

    try:
        built = case.build(tmp)
        if case.kind == "load":
            load_adapter(built)
        elif case.kind == "config":
            from lego_viz.export.recipe import load_config, load_models

            config = load_config(built)
            merge(load_models(config)[0], config.method, config.k, config.weights, **config.options)
        else:
            specs, kwargs = built
            merge(load_adapters(specs), **{"method": "lego", **kwargs})
    except AdapterError as exc:
        return str(exc)
    raise AssertionError(f"case {case.id} raised nothing")


def cli_words(case: Case, tmp: Path) -> list[str]:
    """The CLI command line of a case (``inspect`` for load cases, ``merge`` for merge cases)."""
    built = case.build(tmp)
    if case.kind == "load":
        return ["inspect", os.fspath(built)]
    if case.kind == "config":
        return ["merge", "--config", built, "--out", str(tmp / "out")]
    specs, kwargs = built
    words = ["merge", *specs, "--out", str(tmp / "out")]
    for key, value in kwargs.items():
        if key == "weights":
            words += ["--weights", ",".join(str(v) for v in value)]
        elif key == "k" and isinstance(value, dict):
            words += ["--k", ",".join(f"{name}={rank}" for name, rank in value.items())]
        elif key == "feature":  # a typo has no CLI flag; argparse's own error covers it
            words += ["--feature", str(value)]
        elif key in _FLAGS:
            words += [f"--{key.replace('_', '-')}", str(value)]
        else:  # any other method option, as the CLI spells it
            words += ["--option", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return words


_FLAGS = ("method", "k", "features", "param_reweight", "preset", "seed", "n_init", "density")


def describe() -> list[dict]:
    return [{"id": c.id, "input": c.description, "kind": c.kind, "message": c.message} for c in CASES]


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(describe(), indent=2))
