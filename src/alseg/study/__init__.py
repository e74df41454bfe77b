"""Studies: a grid of experiments (settings × strategies × seeds) from one file, run here or on Ray."""
