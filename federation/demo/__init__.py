"""Demo scenarios, bundled datasets and baseline comparisons (pure Python, no Django)."""
