"""Crowd pricing service: the lowest price a seller set for the buyer's crowd."""

__version__ = "0.1.0"
