"""Noise schedules and samplers as pure step functions (see DESIGN.md)."""
