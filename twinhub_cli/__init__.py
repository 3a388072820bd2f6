"""The ``twinhub`` command line."""
