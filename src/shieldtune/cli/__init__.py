"""The ``shieldtune`` command line."""
