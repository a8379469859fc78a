"""The `cmalign` command line: one small module per command over one library function (installed as cmalign.cli)."""
