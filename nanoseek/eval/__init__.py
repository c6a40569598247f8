"""Evaluation: task scores (pass@1, maj@k) and the report card of a run (markdown + PNG plots)."""
