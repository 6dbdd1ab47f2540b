"""The names and one-line summaries of clipcl's own methods, importable without torch.

``clipcl --help`` and ``clipcl init --help`` list the methods; importing the method modules would pull in torch,
open_clip and peft (seconds) just to print a help page. So the catalog names each built-in method's module and
summary here, the method classes take their ``summary`` from it, and the registry imports a module only when a
method is actually needed. Methods installed by other packages (entry-point group ``clipcl.methods``) are listed by
name without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "clipcl.methods"


@dataclass(frozen=True)
class CatalogEntry:
    module: str
    summary: str


BUILTIN_METHODS: dict[str, CatalogEntry] = {
    "cma": CatalogEntry("clipcl.methods.cma", "mixture of bottleneck adapters routed per image, experts frozen per "
                                              "task, old/new calibration, KD"),
    "dma": CatalogEntry("clipcl.methods.dma", "LoRA per task on the image encoder + class-specific prompts; "
                                              "task-aware inference (default)"),
    "dmc": CatalogEntry("clipcl.methods.dmc", "two stages per task: shared LoRA on images, then a shared text "
                                              "prompt with Gaussian replay"),
    "dmc-ot": CatalogEntry("clipcl.methods.dmc", "dmc + optimal-transport calibration of old class statistics and "
                                                 "task-specific prompt tokens"),
    "finetune": CatalogEntry("clipcl.methods.finetune", "one shared LoRA + class prompts trained task after task, "
                                                        "no protection (baseline, forgets)"),
    "lda": CatalogEntry("clipcl.methods.baselines", "class means of frozen image features with one covariance "
                                                    "pooled over all tasks (baseline, trains nothing)"),
    "ncm": CatalogEntry("clipcl.methods.baselines", "nearest class mean of frozen image features, 'SimpleCIL' "
                                                    "(baseline, trains nothing)"),
    "tppt-v": CatalogEntry("clipcl.methods.tppt", "deep visual prompts guided by frozen class-text anchors "
                                                  "(bidirectional loss), one prompt set"),
    "tppt-vt": CatalogEntry("clipcl.methods.tppt", "tppt-v + a learned shared text context with a relational "
                                                   "diversity regulariser"),
    "zeroshot": CatalogEntry("clipcl.methods.baselines", "frozen CLIP with the prompt 'a photo of a {}.' "
                                                         "(baseline, trains nothing)"),
}


def builtin_summary(name: str) -> str:
    """A built-in method's summary, for its class's ``summary``: one copy of the text, read by both."""
    return BUILTIN_METHODS[name].summary


def method_summaries() -> dict[str, str]:
    """Every method's name and summary (empty for an installed plugin, which is not imported to ask), sorted."""
    summaries = {name: entry.summary for name, entry in BUILTIN_METHODS.items()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        summaries.setdefault(entry.name, "")
    return dict(sorted(summaries.items()))
