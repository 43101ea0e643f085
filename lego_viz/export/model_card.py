"""The ``README.md`` model card an export carries, so the folder can be pushed to the Hub as it is.

The YAML header holds what the Hub indexes (``base_model``, ``library_name: peft``, tags); the body
says how the adapter was made — method, k, each source with its hashes — and ends with the recipe.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lego_viz.adapters import HUB_ID

CARD_NAME = "README.md"
_PIPELINES = {"CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation"}


def _rank_text(ranks: dict[str, int]) -> str:
    values = sorted(set(ranks.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]} (per module)"


def model_card(merged, recipe: dict, dtype: str, task_type: str | None) -> str:
    """The card's text.

    Args:
        merged: the merge (a :class:`lego_viz.merge.MergedAdapter`).
        recipe: the recipe written beside it (shown verbatim, it re-runs the merge).
        dtype: the saved factors' dtype.
        task_type: the exported ``task_type`` (None when heads were left out).
    """
    meta = {"library_name": "peft", "tags": ["lora", "lego-viz", f"merge-{merged.method}"]}
    base = merged.base_model
    if base and HUB_ID.match(base) and not Path(base).exists():
        meta["base_model"] = base  # the Hub refuses a card whose base_model is not a model id (a local path)
    if task_type in _PIPELINES:
        meta["pipeline_tag"] = _PIPELINES[task_type]
    k = merged.options.get("k", "—")
    rows = "\n".join(
        f"| {s['name']} | `{s['source']}` | {w:g} | {s.get('r')} | `{s['sha256'] or 'in memory'}` | `{s.get('config_sha256') or '—'}` |"
        for s, w in zip(merged.sources, merged.weights)
    )
    load = "AutoModelForCausalLM" if task_type == "CAUSAL_LM" else "AutoModel"
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {merged.name}

A LoRA adapter merged from {len(merged.sources)} adapters with lego-viz, method
**{merged.method}** (k = {k}; merged rank {_rank_text(merged.ranks)}; {len(merged.modules)} modules;
saved as {dtype}). The scale is folded into the weights (`lora_alpha = r`).

## Sources

| adapter | source | weight | r | sha256 (weights) | sha256 (adapter_config.json) |
|---|---|---|---|---|---|
{rows}

## Use

```python
from transformers import {load}
from peft import PeftModel

base = {load}.from_pretrained("{merged.base_model or '<base model>'}")
model = PeftModel.from_pretrained(base, "<this repo or folder>")
```

## Recipe

`python -m lego_viz merge --config recipe.yaml --out DIR` redoes this merge (the file is beside this card):

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
