"""Tests of the house wing."""
