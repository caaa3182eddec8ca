"""Tests of the prepare wing."""
