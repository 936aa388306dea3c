"""The tiny SDXL folder fixture lives in tests/conftest.py (shared with the pipeline tests)."""
