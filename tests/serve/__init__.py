"""Tests of the serve wing."""
