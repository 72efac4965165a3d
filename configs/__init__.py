"""YAML presets (models) shipped with the package."""
