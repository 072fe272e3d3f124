"""`grouter demo`: the method end to end on an embedded corpus (see pipeline.py)."""

from .config import PRESETS, Config
from .pipeline import run_demo

__all__ = ["run_demo", "Config", "PRESETS"]
