"""Preprocessing: RAS grid planning and resampling, intensity, the three orthogonal views, the cache."""
