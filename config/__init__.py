"""Quorum's Django project."""
