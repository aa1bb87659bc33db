"""The pipeline: export, engines, deploy, reports."""
