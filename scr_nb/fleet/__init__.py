"""Fleets: one upload job per practice for many practices at once, on a Dask cluster (SPEC 12),
with one rate limit for the whole fleet and a dead worker's practices resumed by another."""
