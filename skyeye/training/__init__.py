"""Training: the SkyEyeGPT stage loop and the layer that runs it on Ray Train or in one process."""
