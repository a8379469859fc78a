"""Fault drills: seeded fault injection (commands killed with SIGKILL, damaged inputs), bounded in time, run in CI."""
