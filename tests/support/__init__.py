"""Importable test helpers (e.g. preprocessors named by import path in settings)."""
