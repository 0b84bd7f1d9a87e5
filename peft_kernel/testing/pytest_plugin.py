"""pytest plugin entry point of the conformance kit (kept import-light)."""
