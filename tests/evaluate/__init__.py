"""Tests of the evaluate wing."""
