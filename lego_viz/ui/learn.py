"""The "Learn" texts shown beside each panel, for someone who has just heard of LoRA."""

INTRO = """
# LoRA-LEGO explorer
A LoRA adapter is a sum of **rank-one pieces**. This app lets you see those pieces, check the two facts
that make them behave like LEGO bricks, and build one adapter out of several by clustering them.
Start with **Load demo zoo** (tiny adapters, one per toy task, on a tiny Llama), then walk through the tabs;
**Load SmolLM2 skills** does the same with skill LoRAs on a real instruct model (SmolLM2-135M, offline).
"""

LOAD = """
### What is in an adapter?
A LoRA adapter changes a frozen weight matrix `W0` (size `d_out × d_in`) by

`ΔW = s · B A`, with `A` of size `r × d_in`, `B` of size `d_out × r` and the scale `s = α / r`.

Written out, that is a sum of `r` rank-one matrices: `ΔW = Σᵢ s · bᵢ aᵢᵀ`, where `aᵢ` is row `i` of
`A` and `bᵢ` is column `i` of `B`. Each pair `(aᵢ, bᵢ)` is a **Minimal Semantic Unit (MSU)**.
An adapter of rank 8 on 28 modules (4 layers × 7 projections, as in the demo zoo) therefore holds
8 × 28 = 224 MSUs — the `#MSUs` column.

**Use** picks which adapters take part in the map, the checks and the merge; **weight** scales an
adapter's contribution (`w · ΔW`, applied to the `b` side of its MSUs); weight 0 leaves it out, like
unticking.
"""

MAP = """
### The MSU map
Every dot is one MSU `(aᵢ, bᵢ)`, drawn as the vector `[aᵢ ; bᵢ]` squeezed to 2-D (UMAP keeps
neighbours close; PCA is the fast linear view). Dots from one module type are comparable, so
"all" shows one panel per module type instead of mixing shapes.

**Feature mode** is what the clustering sees: `raw` vectors; `canonical`, which first removes
the harmless ambiguities of a unit (`(a, b)`, `(−a, −b)` and `(2a, b/2)` give the same `b aᵀ`);
`normalized`, which keeps only directions.

**k** is the rank of the merged adapter: the MSUs of each module are grouped into `k` clusters
and each cluster becomes one rank. Every module is clustered on its own, so "cluster 3" of one
module has nothing to do with "cluster 3" of another — pick a single module to read the colours. Moving k only re-colours the dots — the map itself does not
move, because the points do not depend on k.

**Reweighting.** Averaging vectors that point in slightly different directions makes the average
shorter, so *parameter reweighting* rescales each cluster centre to the mean length of its
members. *Output reweighting* multiplies the merged update by `sqrt(r̄ / k)` to keep the size of
the layer's output close to that of one source adapter.

The map opens on the one module whose units separate most by adapter, coloured by adapter: units
of one LoRA tend to share directions, so its dots gather. Pick "all" or a type to compare modules.

The heatmap shows, for one module, how many MSUs of each adapter landed in each cluster: a
column with one bright cell is a skill kept intact; mixed columns are shared units.
"""

INVARIANCE = """
### Why MSUs behave like LEGO bricks
1. **Permutation invariance.** Reordering the ranks — rows of `A` *together with* the matching
   columns of `B` — changes nothing: `B A = Σᵢ bᵢ aᵢᵀ` does not care about the order of the sum.
2. **Concatenation = summation.** Stacking the `A`s of two adapters and putting their `B`s side by
   side gives one adapter of rank `r₁ + r₂` whose update is exactly `ΔW₁ + ΔW₂`.

The check runs both in **weight space** (relative error of `ΔW`) and in **output space** (the
model's logits on a prompt). Both errors should be at float round-off (about 1e-7).

The **broken** rows shuffle the rows of `A` *without* shuffling `B`: every `aᵢ` gets paired with
the wrong `bⱼ`, and the update changes completely. The pairing is the unit — that is what "minimal
semantic unit" means.
"""

RUN = """
### Does the merge still do the tasks?
Each zoo adapter was trained on one toy task (the task name opens the prompt, e.g. `reverse: lego=`).
Type a prompt and compare the base model, each selected adapter and the current merge.

The **merge lab** scores merges on held-out prompts (exact match), through the path a user takes:
export the merge as a PEFT folder, load it with `PeftModel.from_pretrained`, decode greedily.

* **Accuracy table** — every merge method at the same rank (the mean source rank r̄ and 2·r̄), the
  exact sum (`linear`), the base and each adapter alone. *mean* has its 95% interval; *retention* is
  the accuracy as a share of each adapter's own; *control* is the same merge of **random adapters**
  with the same shapes and unit sizes — a method earns credit only for its *margin* over that.
* **Retention vs number of adapters** — the more adapters share one merge, the less each keeps;
  a few seeded subsets per size, mean ± sd.
* **k-sweep** — accuracy and the distance of the merged `ΔW` to the exact weighted sum against `k`.
  LEGO keeps units whole; `svd` keeps the best rank-`k` approximation of the sum.
"""

EXPORT = """
### Take the merge with you
The download is an ordinary PEFT LoRA folder (`r = k`, `lora_alpha = k`, so the scale is 1 and
already folded into the weights), plus `merge_report.json` (inputs, hashes, every option,
cluster sizes, timings), `recipe.yaml`, which re-runs the same merge from the command line, and a
model card `README.md`, so the folder can be pushed to the Hub as it is. Save it in bf16 to halve its
size; set a max rank if your server caps it (vLLM's `max_lora_rank` is 16 by default).
"""

PEFT_SNIPPET = """\
from transformers import {auto_class}
from peft import PeftModel

base = {auto_class}.from_pretrained("{base_model}"){head_note}
model = PeftModel.from_pretrained(base, "{folder}")  # the unzipped folder
# Re-run the same merge from the command line (the recipe names the source adapters):
#   python -m lego_viz merge --recipe {folder}/recipe.yaml --out merged_again
"""


def peft_snippet(base_model: str, folder: str, task_type: str | None = "CAUSAL_LM") -> str:
    """The "load it with PEFT" code for an export whose config says `task_type`.

    A causal-LM merge loads on `AutoModelForCausalLM`; anything else (classification heads are not
    merged, so their task type is exported as null) on the bare `AutoModel`.
    """
    causal = task_type == "CAUSAL_LM"
    return PEFT_SNIPPET.format(
        auto_class="AutoModelForCausalLM" if causal else "AutoModel",
        base_model=base_model,
        folder=folder,
        head_note="" if causal else "  # not a causal-LM merge (task heads are never merged): use the class your task needs",
    )
