"""Quantization: the int4 primitives (int4.py), the simulated engine (simulate_linear.py, simulate.py),
calibration (calibrate.py) and the methods (methods.py names them). This package file imports nothing, so
that importing any one of its modules (the scheme table imports int4.py) runs only that module's own layer
and the layers below it (docs/architecture.md, "The converter")."""
