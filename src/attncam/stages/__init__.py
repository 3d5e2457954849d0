"""attncam.stages."""
