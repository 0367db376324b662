"""Experiment planning (``segapp plan``): the dataset fingerprint and the plan made from it."""

from app.planning.fingerprint import compute_fingerprint, load_plan, make_plan, plan_from_manifest, write_plan

__all__ = ["compute_fingerprint", "load_plan", "make_plan", "plan_from_manifest", "write_plan"]
