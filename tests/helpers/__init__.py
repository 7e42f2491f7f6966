"""Helpers the tests share (no test module imports another; see test_test_layout.py)."""
