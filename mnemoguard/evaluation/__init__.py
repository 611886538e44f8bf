"""Ground-truth metrics: pure functions that score generations, detectors and localisation maps.

* :mod:`.nearest_neighbour` - nearest-neighbour ratio (Gu et al.), memorized fraction with a bootstrap interval,
  template-verbatim masked distance (Webster; Kim & Lee), overshoot-aware direction check.
* :mod:`.detection` - ROC curve, ROC AUC, TPR at a fixed FPR (both literature conventions), balanced accuracy.
* :mod:`.localization` - Kim & Lee's threshold sweep (global IoU, mIoU, pixel accuracy) and pixel AUROC.
* :mod:`.fidelity` - prompt fidelity of class-captioned generations with a small pixel classifier.

See ``docs/evaluation.md`` for definitions, sources and conventions.
"""

from .detection import (
    RocCurve,
    TprConvention,
    detection_summary,
    max_balanced_accuracy,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from .fidelity import PromptFidelityClassifier
from .localization import (
    KIM_LEE_THRESHOLDS,
    LocalizationSweep,
    localization_sweep,
    normalize_maps_global,
    pixel_auroc,
    upsample_maps,
)
from .nearest_neighbour import (
    GU_RATIO_THRESHOLD,
    KIM_LEE_TV_THRESHOLD,
    BootstrapEstimate,
    NearestNeighbourRatio,
    OvershootAlignment,
    bootstrap_mean,
    find_duplicates,
    is_memorized,
    masked_sq_distance,
    memorized_fraction,
    nearest_neighbour_distances,
    nearest_neighbour_ratio,
    overshoot_alignment,
    overshoot_memorized,
    template_verbatim,
)

__all__ = [
    # nearest_neighbour
    "GU_RATIO_THRESHOLD",
    "KIM_LEE_TV_THRESHOLD",
    "BootstrapEstimate",
    "NearestNeighbourRatio",
    "OvershootAlignment",
    "bootstrap_mean",
    "find_duplicates",
    "is_memorized",
    "masked_sq_distance",
    "memorized_fraction",
    "nearest_neighbour_distances",
    "nearest_neighbour_ratio",
    "overshoot_alignment",
    "overshoot_memorized",
    "template_verbatim",
    # detection
    "RocCurve",
    "TprConvention",
    "detection_summary",
    "max_balanced_accuracy",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
    # localization
    "KIM_LEE_THRESHOLDS",
    "LocalizationSweep",
    "localization_sweep",
    "normalize_maps_global",
    "pixel_auroc",
    "upsample_maps",
    # fidelity
    "PromptFidelityClassifier",
]
