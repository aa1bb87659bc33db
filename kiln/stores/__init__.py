"""Artifact stores: the contract, a local folder, S3."""
