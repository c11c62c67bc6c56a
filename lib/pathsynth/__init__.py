"""pathsynth: synthetic-data studies in digital pathology (Osorio et al. 2023; Redekop et al. 2025)."""
__version__ = "0.1.0"
