"""Quantized weight types and the passes that make them (see DESIGN.md)."""
