"""Converters to the HeartBeat HDF5 schema (docs/ARCHITECTURE.md §Data): phantom, CAMUS, M&Ms, and
condition extractors."""
