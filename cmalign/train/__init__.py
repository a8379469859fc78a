"""`cmalign fit`: the configuration, the training loop, distributed/precision setup and the resumable run directory."""
