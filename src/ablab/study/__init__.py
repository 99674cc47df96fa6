"""The study: what to train, how, in which variants, over which seeds -- validated.

Owns: the specification schema (``schema``: pydantic models, ``Study``), loading a TOML file or
dict with friendly errors (``loading``), Keras loss / metric names (``keras_names``), sweeps
expanded into arms (``sweep``) and BatchNormalization remedies (``remedies``).
May import: ``ablab.errors``. Nothing here trains, stores or prints.
"""
