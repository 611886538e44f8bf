"""The bench's mitigation arms: each action of the guard alone, always on, or a policy that switches actions on.

``mnemoguard bench --set train.mitigation=NAME`` trains the testbed with one arm; the same seed with ``none`` is the
unmitigated reference (``python scripts/summarize_mitigation.py`` puts the arms side by side). Each
arm's settings are the action's published default where one exists, scaled to the testbed where it does not:

* ``noise_gap_low`` / ``noise_gap_mid``: the noise-gap scheduler with ``timestep_bias_strategy: gap`` and
  multiplier 0 over t in [0, 333) / [333, 666) — that band is never trained (Dodson et al.'s "under-train the
  danger zone"; the testbed's loss gap sits in the low band, its danger zone at mid to high noise);
  ``noise_gap_low_half``: the low band at half its weight (multiplier 0.5); ``noise_gap_prior``: Dodson et al.'s
  gap training as the paper runs it, static from step 0 over the data prior's band — t in [180, 740), the union of
  the prior bands the tracker found on the digits fine-tuning testbed in 3 seeds (sigma ~0.29-2.35; another data
  set has another band: read it off ``mem/danger_zone/prior_sigma_{lo,hi}``).
* ``adaptive_gap``: the danger-zone tracker on, and the noise gap following its live band (switched on when the
  at-risk probes' return rate rises above the held-out images', at a strength that follows the excess, released
  when it falls; ``guard.noise_gap.follow_danger_zone``).
* ``wen_filter``: Wen et al.'s training-time filter, samples with ||eps_c - eps_0||_2 >= tau dropped, tau =
  :data:`WEN_TAU_TESTBED`, calibrated on the fine-tuning variant (``scripts/calibrate_wen_threshold.py``): it drops
  5 % of plain samples at the base model and, at step 500 of the unmitigated run, 55 % of the planted ones (and 21 %
  of the plain ones).
  That it equals their SD 1.4 value (2, for 16,384 values per sample; here 256) is a coincidence.
* ``iet_agc``: IET-AGC's low-loss gating with the authors' SD setting (mem_ratio 1.25).
* ``caption_replacement`` / ``embedding_noise``: Somepalli et al.'s random caption replacement (p = 0.1, 4 random
  tokens) / Gaussian noise on the text embeddings (lambda = 0.1).
* ``caption_dropout``: 0.1 more caption dropout on top of the recipe's.
* ``preservation``: MSE to the EMA's prediction on every training sample (weight 1, ai-toolkit's default).
* ``policy``: ``guard.default_policy: true``, the mitigation of :func:`mnemoguard.config.default_policy` (since
  issue 19 ``duplicate_weight`` from step 0: the same training as that arm).
* ``duplicate_weight``: the loss of each sample divided by its image's copies in the data set (the monitor's
  duplicate scan; deduplication in expectation, Carlini et al. 2023, Somepalli et al. 2023), from step 0;
  ``danger_zone_duplicate``: the same switched on when the tracker's excess reaches the band's on-level (0.5), off
  after 2 measurements below its release level (0.25).
* ``danger_zone_policy``: the default policy before issue 19: the danger-zone tracker on, IET-AGC's gating switched
  on when the excess reaches the band's on-level (0.5) and off after 2 measurements below its release level (0.25).
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, Rule

__all__ = ["MITIGATIONS", "READS_MONITOR", "WEN_TAU_TESTBED", "apply_mitigation"]

WEN_TAU_TESTBED = 2.0  # ||eps_c - eps_0||_2 over 256 values (1 x 16 x 16); see the module docstring


def _noise_gap(begin: int, end: int) -> dict[str, Any]:
    return {"noise_gap": {"enabled": True, "timestep_bias_strategy": "gap", "timestep_bias_begin": begin,
                          "timestep_bias_end": end, "timestep_bias_multiplier": 0.0}}


MITIGATIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "noise_gap_low": _noise_gap(0, 333),
    "noise_gap_mid": _noise_gap(333, 666),
    "noise_gap_low_half": {"noise_gap": {**_noise_gap(0, 333)["noise_gap"], "timestep_bias_multiplier": 0.5}},
    "noise_gap_prior": _noise_gap(180, 740),
    "adaptive_gap": {"noise_gap": {"enabled": True, "follow_danger_zone": True}, "danger_zone": True},
    "wen_filter": {"regularizers": {"wen_filter": {"threshold": WEN_TAU_TESTBED}}},
    "iet_agc": {"regularizers": {"iet_agc": {}}},
    "caption_replacement": {"regularizers": {"random_caption_replacement": {"prob": 0.1}}},
    "embedding_noise": {"regularizers": {"gaussian_embedding_noise": {"lam": 0.1}}},
    "caption_dropout": {"regularizers": {"caption_dropout": {"prob": 0.1}}},
    "preservation": {"regularizers": {"baseline_preservation": {"weight": 1.0}}},
    "policy": {"policy": "default"},
    "duplicate_weight": {"regularizers": {"duplicate_weight": {}}},
    "danger_zone_duplicate": {"danger_zone": True, "regularizers": {"duplicate_weight": {"enabled": False}},
                              "rules": [{"signal": "mem/danger_zone/excess", "action": "duplicate_weight",
                                         "threshold": 0.5, "release": 0.25, "release_patience": 2}]},
    "danger_zone_policy": {"danger_zone": True, "regularizers": {"iet_agc": {"enabled": False}},
                           "rules": [{"signal": "mem/danger_zone/excess", "action": "iet_agc", "threshold": 0.5,
                                      "release": 0.25, "release_patience": 2}]},
}


#: the arms that read the monitor (its signals, its probes for the tracker, or its duplicate scan)
READS_MONITOR = frozenset({"policy", "adaptive_gap", "danger_zone_policy", "duplicate_weight",
                           "danger_zone_duplicate"})


def apply_mitigation(guard: Any, name: str, monitor_on: bool) -> None:
    """Turn on arm ``name`` in a recipe's ``guard`` section (a :class:`~mnemoguard.config.GuardConfig`).

    Raises:
        ConfigError: an unknown arm, or an arm of :data:`READS_MONITOR` without the monitor.
    """
    if name not in MITIGATIONS:
        raise ConfigError(f"train.mitigation: expected one of {sorted(MITIGATIONS)}, found {name!r}")
    if name in READS_MONITOR and not monitor_on:
        raise ConfigError(f"train.mitigation={name}: it reads the monitor's signals; set train.monitor_every > 0, "
                          "found 0")
    arm = MITIGATIONS[name]
    if not arm:
        return
    guard.enabled = True
    guard.monitor.enabled = monitor_on
    if "noise_gap" in arm:
        for key, value in arm["noise_gap"].items():
            setattr(guard.noise_gap, key, value)
    for reg, settings in arm.get("regularizers", {}).items():
        guard.regularizers[reg] = {**guard.regularizers.get(reg, {}), **settings}
    if arm.get("danger_zone"):
        guard.danger_zone.enabled = True
    if arm.get("rules"):
        guard.policy = [*guard.policy, *(Rule(**rule) for rule in arm["rules"])]
    if arm.get("policy") == "default":
        guard.default_policy = True
