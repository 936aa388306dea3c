"""The conversion utility's entry point from a checkout: `python -m convert SRC DST`."""
