"""Serving SkyEyeGPT: the OpenAI-compatible API on Ray Serve (`app`), its request contract
(`protocol`, `media`), the batched engine (`engine`), its limits (`config`) and the
deployment of a registered version (`deploy`)."""
