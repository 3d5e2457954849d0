"""attncam.explain.methods."""
