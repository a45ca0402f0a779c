"""Release time, on the instructor's machine: checks, student notebook, reference data, bundle."""
