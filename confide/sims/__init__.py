"""Simulation: run a whole federation locally and (later) price it."""
