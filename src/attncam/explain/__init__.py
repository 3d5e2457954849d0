"""attncam.explain."""
