"""SkyEyeGPT: frozen vision encoder, alignment layer, LLM decoder with LoRA; and `references`,
which resolve a model folder, a tuning-stage run id or a registry URI to a loaded SkyEyeGPT."""
from ..config import configure_environment

configure_environment()  # quiet, offline-friendly Hugging Face defaults before transformers loads
