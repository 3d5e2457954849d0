"""attncam.viz."""
