"""The TPC-CMA method itself: its settings, the CMA loss, the three-phase curriculum, the gradient-aware
scheduler, and one training step (:mod:`cmalign.objective.step`) that puts them together."""
