"""Flower ServerApp and ClientApp of bench/round_split.py (see bench/_flower.py)."""
