"""A DICOM node in the hospital's network (``segapp serve``): a C-STORE SCP (and optionally STOW-RS) receives
studies into a spool folder; a series counts as complete after an idle timeout; routing rules (the config's and
the bundles' own ``series_rules``) choose a bundle; jobs live in a persistent SQLite queue (WAL, leases) so a
restarted node resumes and never runs a series twice; worker processes (one model each, GPUs round robin) run
the per-series pipeline and send the results to the configured destinations; an HTTP endpoint reports the
queue as JSON. It sits above inference (layer 5) and uses bundle, io and reporting; nothing here prints.
"""
