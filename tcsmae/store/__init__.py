"""The tcsmae CT store: a Zarr v3 group of HU volumes plus a slice index (docs/store-format.md)."""
