"""The ``emopt`` command-line tool: compare optimizers on real bundled data, and time their steps.

Entry point: :func:`emerging_optimizers.cli.main.main` (console script ``emopt``, or
``python -m emerging_optimizers``). See ``emopt --help``.
"""
