"""Generation engine: sampling, streaming text output, and the decode loop."""
