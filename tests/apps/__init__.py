"""Test-only Flower apps (never part of a deployment)."""
