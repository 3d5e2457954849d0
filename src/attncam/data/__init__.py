"""attncam.data."""
