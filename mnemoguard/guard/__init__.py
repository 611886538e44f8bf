"""The training-time guard: :class:`Guard` (the one driver of the guard's components, in the reference trainer and in
your own Accelerate loop), its typed :class:`GuardContext`, the builder and the run state."""

from .build import Components, build_components, load_guard_config
from .context import GuardContext
from .guard import Guard

__all__ = ["Components", "Guard", "GuardContext", "build_components", "load_guard_config"]
