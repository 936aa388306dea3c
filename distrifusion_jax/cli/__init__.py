"""Command-line entry points (console scripts `distrifusion-convert`, `distrifusion-generate`)."""
