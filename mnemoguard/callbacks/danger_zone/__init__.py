"""The danger-zone tracker: the noise band where the model memorizes, from the data (a prior) and from the live
model (return rates per noise level), with the band the noise gap follows (:class:`DangerZoneTracker`)."""

from .measure import ReturnProfile, band_from_excess, band_timesteps, return_flags, return_profile, sequential_copies
from .prior import data_prior
from .tracker import DangerZoneTracker

__all__ = ["DangerZoneTracker", "ReturnProfile", "band_from_excess", "band_timesteps", "data_prior", "return_flags",
           "return_profile", "sequential_copies"]
