"""Shared fixtures: an in-memory connection driven by the real actor."""

from __future__ import annotations
