"""attncam.models."""
