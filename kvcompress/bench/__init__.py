"""Benchmark commands: figures printed from real runs, never timed tests."""
