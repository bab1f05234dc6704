"""inferplane."""
