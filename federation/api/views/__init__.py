"""API views: one class per URL, one method per operation, each validating input, calling one
service or selector, and serializing. Access is decided by ``federation.permissions`` (through
``access_*`` and the services), errors are mapped by ``federation.api.exceptions``."""
