"""The transfer matrix (DESIGN.md §1): dataset size x similarity -> a plan, with its reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ml.errors import ConfigError

# Where "similar" starts on the 0..1 similarity score (ml.similarity: calibrated on the shared datasets).
SIMILARITY_THRESHOLD = 0.5


@dataclass(frozen=True)
class Similarity:
    score: float  # 0 (unlike ImageNet) .. 1 (ImageNet-like); >= SIMILARITY_THRESHOLD reads "similar"
    bn_divergence: float | None  # median over BN layers of the per-channel symmetric KL (None: no BN layers)
    head_entropy: float  # normalised, 0..1

    def to_dict(self) -> dict[str, float | None]:
        return {k: None if v is None else round(v, 4) for k, v in self.__dict__.items()}


SIZE_BOUNDARY = 300  # training images per class; at or above is "large"


@dataclass(frozen=True)
class PlanSpec:
    """One plan of the matrix: where it is the prior, what runs, and what it may spend."""

    name: str  # what users pick (API, CLI, UI)
    cell: str  # the matrix cell it is the prior for
    label: str  # what runs, in a few words
    why: str  # the end of the reason sentence
    stage_probes: bool  # intermediate stages are probe candidates beside the top layer
    # The fine-tune candidate's depth (or None: probes only). A fine-tune still has to earn its keep:
    # it must beat the chosen probe on a held-out slice of the training split (ml.fit.train).
    finetune: str | None


# The registry: adding a plan means one entry here (the engine reads only these fields).
REGISTRY: dict[str, PlanSpec] = {
    p.name: p
    for p in (
        PlanSpec(
            "linear",
            "small-similar",
            "Linear probe on the top layer",
            "few images that look like ImageNet, so the pretrained top-layer features already separate them: "
            "a linear probe",
            stage_probes=False,
            finetune=None,
        ),
        PlanSpec(
            "stages",
            "small-different",
            "Linear probes on several stages; best kept; a fine-tune if its pilot pays",
            "few images unlike ImageNet, so the top layer may be too specialised: linear probes on several "
            "stages, best kept, and a fine-tune of the top stages if a pilot shows it pays",
            stage_probes=True,
            finetune="partial",
        ),
        PlanSpec(
            "partial",
            "large-similar",
            "Fine-tune the top stages",
            "plenty of ImageNet-like images: fine-tune the top stages at 1/10 of the original learning rate",
            stage_probes=False,
            finetune="partial",
        ),
        PlanSpec(
            "full",
            "large-different",
            "Fine-tune most or all stages",
            "plenty of images unlike ImageNet: fine-tune most of the network at 1/10 of the original learning rate",
            stage_probes=True,
            finetune="full",
        ),
    )
}
PLANS = {p.cell: p.name for p in REGISTRY.values()}  # cell -> the plan it runs by default
STRATEGIES = ("auto", *REGISTRY)


def finetune_depth(plan: Plan, override: str = "auto") -> str | None:
    """The fine-tune candidate's depth: the cell's allowance; when the user picked a plan, that plan's
    own (a probe plan they picked means probes only)."""
    if override != "auto":
        return override if REGISTRY[override].finetune == override else None
    return REGISTRY[plan.name].finetune


@dataclass(frozen=True)
class Plan:
    name: str  # the strategy that runs
    cell: str
    images_per_class: float
    similarity: float
    reason: str
    measurements: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
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
        name, reason = PLANS[cell], f"{cell}: {facts}; {REGISTRY[PLANS[cell]].why}."
    if name not in available:
        reason += f" '{name}' is not available in this build, so a linear probe runs instead."
        name = "linear"
    return Plan(name, cell, round(images_per_class, 1), round(similarity.score, 4), reason, similarity.to_dict())
