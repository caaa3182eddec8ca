"""Tests of the foundation wing."""
