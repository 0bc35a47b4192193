"""Integrations with other libraries (optional extras; imported on demand)."""
