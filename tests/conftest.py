"""Test-wide settings: headless plotting and a small, fixed thread count for steady timings."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
