"""The transfer matrix (DESIGN.md §1): dataset size x similarity -> a plan, with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ml.errors import ConfigError
from ml.similarity import SIMILARITY_THRESHOLD, Similarity

SIZE_BOUNDARY = 300  # training images per class; at or above is "large"

# cell -> strategy: linear probe on top features; linear probes on several stages (best kept);
# fine-tune the top stages; fine-tune most or all stages.
PLANS = {
    "small-similar": "linear",
    "small-different": "stages",
    "large-similar": "partial",
    "large-different": "full",
}
STRATEGIES = ("auto", "linear", "stages", "partial", "full")
# How much compute the matrix lets a fine-tune candidate spend per cell: its depth, or None for
# probes only. A fine-tune candidate still has to earn its keep: its pilot epochs must beat the
# probe on a held-out slice of the training split (ml.finetune), or the probe is returned.
FINETUNE_DEPTH = {
    "small-similar": None,
    "small-different": "partial",
    "large-similar": "partial",
    "large-different": "full",
}


def finetune_depth(plan: Plan, override: str = "auto") -> str | None:
    """The fine-tune candidate's depth for this plan: the user's choice, else the cell's allowance."""
    if override != "auto":
        return override if override in ("partial", "full") else None
    return FINETUNE_DEPTH[plan.cell]


_WHY = {
    "small-similar": (
        "few images that look like ImageNet, so the pretrained top-layer features already separate them: a linear probe"
    ),
    "small-different": (
        "few images unlike ImageNet, so the top layer is too specialised: linear probes on several stages, best kept"
    ),
    "large-similar": "plenty of ImageNet-like images: fine-tune the top stages at 1/10 of the original learning rate",
    "large-different": (
        "plenty of images unlike ImageNet: fine-tune most of the network at 1/10 of the original learning rate"
    ),
}


@dataclass(frozen=True)
class Plan:
    name: str  # the strategy that runs
    cell: str
    images_per_class: float
    similarity: float
    reason: str
    measurements: dict

    def to_dict(self) -> dict:
        return asdict(self)


def cell_for(
    images_per_class: float,
    similarity: float,
    *,
    boundary: int = SIZE_BOUNDARY,
    threshold: float = SIMILARITY_THRESHOLD,
) -> str:
    size = "large" if images_per_class >= boundary else "small"
    kind = "similar" if similarity >= threshold else "different"
    return f"{size}-{kind}"


def decide(
    images_per_class: float,
    similarity: Similarity,
    *,
    override: str = "auto",
    boundary: int = SIZE_BOUNDARY,
    available: tuple[str, ...] = tuple(PLANS.values()),
) -> Plan:
    if override not in STRATEGIES:
        raise ConfigError(f"Unknown strategy '{override}'. Valid choices: {', '.join(STRATEGIES)}.")
    cell = cell_for(images_per_class, similarity.score, boundary=boundary)
    size_cmp = ">=" if images_per_class >= boundary else "<"
    sim_cmp = ">=" if similarity.score >= SIMILARITY_THRESHOLD else "<"
    facts = (
        f"{images_per_class:.0f} training images per class ({size_cmp} {boundary}) "
        f"and similarity {similarity.score:.2f} ({sim_cmp} {SIMILARITY_THRESHOLD})"
    )
    if override != "auto":
        name, reason = override, f"Strategy '{override}' chosen by the user; the data reads {cell}: {facts}."
    else:
        name, reason = PLANS[cell], f"{cell}: {facts}; {_WHY[cell]}."
    if name not in available:
        reason += f" '{name}' is not available in this build, so a linear probe runs instead."
        name = "linear"
    return Plan(name, cell, round(images_per_class, 1), round(similarity.score, 4), reason, similarity.to_dict())
