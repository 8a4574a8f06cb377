"""Placeholder: being written (issue 16)."""
