"""The aligned space measured: plain functions, numpy arrays in, numbers out (no torch, no model)."""
