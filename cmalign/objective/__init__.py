"""The TPC-CMA method itself: the CMA loss, the three-phase curriculum, the gradient-aware scheduler, one training step."""
