"""Which embedding space dedup and decontamination judge copies in, and which thresholds apply there.

A threshold belongs to a space: DINOv2's 0.6 / 0.45 are cosines between SSCD copy-detection
descriptors. Applied to a ViT's CLS embeddings they link look-alikes, and connected components
then chain them into huge groups that are removed. So `auto` thresholds take the known value
of the space, and where no value is known the run stops before any work, with a message that
names the setting to give; a number in the config is used as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from lvd.curate.config import ConfigError
from lvd.pretrain.models.copy_detection import SSCD_INSTALL_HINT, CopyDetectorChoice, resolve_copy_detector

# Known thresholds per descriptor space: the cosine at or above which two images are
# near-duplicates (`dedup`) or a pool image is a copy of an eval image (`decontam`). SSCD's are
# the DINOv2 paper's (Sec. 3 / App. A).
SPACE_THRESHOLDS = MappingProxyType(
    {
        "sscd": MappingProxyType({"dedup": 0.6, "decontam": 0.45}),
    }
)

# The demo's measured values for the ViT-S/14 CLS space, quoted in the error as an example.
CLS_EXAMPLE = (
    "the packaged demo config uses dedup.threshold=0.99 and decontam.threshold=0.985 measured for a ViT-S/14's "
    "CLS embeddings"
)


def known_threshold(space: str | None, purpose: str) -> float | None:
    """The known `dedup` / `decontam` threshold of a space, or None."""
    if space is None or space not in SPACE_THRESHOLDS:
        return None
    return SPACE_THRESHOLDS[space].get(purpose)


@dataclass(frozen=True)
class DedupSpace:
    """The space near-duplicates are judged in, as the config says."""

    folder: str  # relative to the run folder: embed or embed/copy
    space: str | None  # a SPACE_THRESHOLDS key, or None when no threshold is known
    description: str
    copy_detector: CopyDetectorChoice | None


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # "config", or "known for <space>"

    def record(self) -> dict:
        return {"value": self.value, "source": self.source}


def dedup_space(cfg) -> DedupSpace:
    """The copy-detection space when a model is configured (or `auto` finds SSCD), else the main embeddings."""
    try:
        choice = resolve_copy_detector(cfg.embed.copy_detection.weights, cfg.embed.copy_detection.space)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"embed.copy_detection: {exc}") from None
    if choice is None:
        return DedupSpace("embed", None, f"the main embeddings of {cfg.embed.model} (embed/)", None)
    known = f"the {choice.space} space" if choice.space else "a space with no known threshold"
    return DedupSpace(
        "embed/copy", choice.space, f"copy-detection model {choice.describe()}, {known} (embed/copy/)", choice
    )


def _missing_threshold(key: str, space: DedupSpace) -> ConfigError:
    if space.copy_detector is None:
        fix = (
            f"install the SSCD copy-detection model ({SSCD_INSTALL_HINT}) and leave "
            "embed.copy_detection.weights=auto, or set embed.copy_detection.weights to an SSCD model"
        )
    else:
        fix = (
            f"set embed.copy_detection.space ({', '.join(sorted(SPACE_THRESHOLDS))}) if "
            f"{space.copy_detector.describe()} is such a model"
        )
    return ConfigError(
        f"{key} is auto, but near-copies would be judged in {space.description}, where lvd knows no threshold "
        f"(DINOv2's 0.6 / 0.45 are for SSCD descriptors; in another space they remove look-alikes, not copies). "
        f"Either {fix}, or set {key} to a threshold measured for this space ({CLS_EXAMPLE})."
    )


def resolve_threshold(value, key: str, purpose: str, space: DedupSpace) -> Threshold:
    """`dedup.threshold` / `decontam.threshold` (auto or a number) -> the cosine to apply."""
    if str(value).strip().lower() == "auto":
        known = known_threshold(space.space, purpose)
        if known is None:
            raise _missing_threshold(key, space)
        return Threshold(float(known), f"known for {space.space}")
    try:
        return Threshold(float(value), "config")
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be auto or a number, got {value!r}") from None


def resolve_thresholds(cfg, decontaminate: bool) -> tuple[DedupSpace, Threshold, Threshold | None]:
    """(space, dedup threshold, decontam threshold or None when there is nothing to decontaminate against)."""
    space = dedup_space(cfg)
    near = resolve_threshold(cfg.dedup.threshold, "dedup.threshold", "dedup", space)
    decontam = (
        resolve_threshold(cfg.decontam.threshold, "decontam.threshold", "decontam", space) if decontaminate else None
    )
    return space, near, decontam


def check_before_run(cfg) -> None:
    """Fail before the first stage when dedup would later stop for want of a threshold."""
    resolve_thresholds(cfg, decontaminate=bool(len(cfg.sources.eval or {})))
