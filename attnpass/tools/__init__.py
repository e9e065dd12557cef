"""Tools around the pass: calibration, fidelity measurement, reference attention, the CLI."""
