"""Tests of the export wing."""
