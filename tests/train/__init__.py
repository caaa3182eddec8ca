"""Tests of the train wing."""
