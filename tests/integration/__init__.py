"""Integration tests that run against a real Apache Kafka broker (see tests/conftest.py)."""
