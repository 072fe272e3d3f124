"""`grouter demo`: the method end to end on an embedded corpus (see pipeline.py)."""

from .pipeline import PRESETS, Config, run_demo

__all__ = ["run_demo", "Config", "PRESETS"]
