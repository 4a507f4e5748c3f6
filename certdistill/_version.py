"""The package version, in one place (read by the package root, the CLI and the file writers)."""

__version__ = "0.1.0.dev0"
