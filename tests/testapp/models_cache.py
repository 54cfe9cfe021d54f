"""Placeholder; the pillar fills this in."""
