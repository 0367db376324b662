"""Data-set fingerprint and training plan (``segapp plan``): see :mod:`app.plan.fingerprint`."""

from app.plan.fingerprint import compute_fingerprint, load_plan, make_plan, plan_from_manifest, write_plan

__all__ = ["compute_fingerprint", "load_plan", "make_plan", "plan_from_manifest", "write_plan"]
