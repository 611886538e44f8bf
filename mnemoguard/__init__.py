__version__ = '0.1.0'

__all__ = ["Guard", "__version__"]


def __getattr__(name: str):
    # Lazy: `import mnemoguard` stays light (no torch / diffusers) until the guard is asked for.
    if name == "Guard":
        from .guard import Guard

        return Guard
    raise AttributeError(f"module 'mnemoguard' has no attribute {name!r}")
