"""Ground-truth metrics: pure functions that score generations, detectors and localisation maps.

* :mod:`.nearest_neighbour` - nearest-neighbour ratio (Gu et al.), exact-duplicate search.
* :mod:`.bootstrap` - memorized fraction with a percentile-bootstrap interval (Bonnaire et al.).
* :mod:`.template_verbatim` - template-verbatim masked distance (Webster; Kim & Lee).
* :mod:`.overshoot` - overshoot-aware direction check (Kim, Kim & Lee).
* :mod:`.detection` - ROC curve, ROC AUC, TPR at a fixed FPR (both literature conventions), balanced accuracy.
* :mod:`.localization` - Kim & Lee's threshold sweep (global IoU, mIoU, pixel accuracy) and pixel AUROC.
* :mod:`.fidelity` - prompt fidelity of class-captioned generations with a small pixel classifier.

See ``docs/evaluation.md`` for definitions, sources and conventions.
"""

from .bootstrap import BootstrapEstimate, binomial_lower_bound, bootstrap_mean, memorized_fraction
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
    NearestNeighbourRatio,
    find_duplicates,
    is_memorized,
    nearest_neighbour_distances,
    nearest_neighbour_ratio,
)
from .overshoot import OvershootAlignment, overshoot_alignment, overshoot_memorized
from .template_verbatim import KIM_LEE_TV_THRESHOLD, masked_sq_distance, template_verbatim

__all__ = [
    # nearest_neighbour
    "GU_RATIO_THRESHOLD",
    "NearestNeighbourRatio",
    "find_duplicates",
    "is_memorized",
    "nearest_neighbour_distances",
    "nearest_neighbour_ratio",
    # bootstrap
    "BootstrapEstimate",
    "bootstrap_mean",
    "binomial_lower_bound",
    "memorized_fraction",
    # template_verbatim
    "KIM_LEE_TV_THRESHOLD",
    "masked_sq_distance",
    "template_verbatim",
    # overshoot
    "OvershootAlignment",
    "overshoot_alignment",
    "overshoot_memorized",
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
