"""SkyEye-Synth: the procedural offline stand-in for the 8 RS benchmarks."""
