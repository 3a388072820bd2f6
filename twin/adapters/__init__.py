"""Adapters of the twin store port: :mod:`twin.adapters.mongo` (MongoDB / FerretDB)."""
