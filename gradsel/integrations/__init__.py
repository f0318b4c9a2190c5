"""Thin wrappers around the core for other libraries; each imports its library lazily."""
