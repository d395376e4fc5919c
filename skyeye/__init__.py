"""SkyEye: the SkyEyeGPT platform domain library."""
