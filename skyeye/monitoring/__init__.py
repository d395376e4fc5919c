"""After deployment: the inference log's schema and reader, and the image signals shared by
the served model, the drift monitor and the data gate (perceptual hash, encoder signature)."""
