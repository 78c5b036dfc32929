"""Simulation of the engine at cluster scale: the real scheduler against a cost model (issue 16)."""
