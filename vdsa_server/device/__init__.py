"""Device model layer: the emulated DSA's register file, shared data structures and behaviour."""
