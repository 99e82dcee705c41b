"""Composition: expression -> checked plan (plan.py, metadata only) -> output blob (engine.py, torch)."""
