"""The cases' fixtures and hooks come from the qiotests plugin (``harness.plugin``)."""
