"""Dashboard pages, one module per area; every read goes through federation's selectors."""
