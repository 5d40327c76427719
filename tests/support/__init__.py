"""Test helpers (tiny random models); never shipped in the wheel."""
