"""Writes of the federation domain: typed, keyword-only, transactional."""
