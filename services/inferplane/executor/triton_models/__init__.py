"""Triton Python-backend model code; the renderer copies model.py (and inferplane.modeling) into a model folder."""
