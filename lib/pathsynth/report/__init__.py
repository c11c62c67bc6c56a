"""The study report (notebook 09): claims against the papers, extras, figure index and provenance."""
