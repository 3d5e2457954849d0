"""attncam.metrics."""
