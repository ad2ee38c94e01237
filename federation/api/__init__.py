"""The REST API under /api/v1/ (docs/api.md): thin DRF views over services and selectors."""
