"""Converters to the HeartBeat HDF5 schema (DESIGN.md §4): phantom, CAMUS, M&Ms, and condition extractors."""
