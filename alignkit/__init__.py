"""alignkit: composable alignment steps for language models.

The library is importable on its own (`alignkit.io`, `alignkit.records`, ...); the CLI in
`alignkit.cli` is a thin layer over it. Importing this package imports nothing heavy.
"""
__version__ = "0.1.0"
