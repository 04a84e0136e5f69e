"""Launchers start one worker process per trial attempt (``local`` now; Kubernetes Jobs later)."""
