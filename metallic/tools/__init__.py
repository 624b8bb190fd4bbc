"""Front-end tools beside generation: benchmarks, profiles, device checks and plots."""
