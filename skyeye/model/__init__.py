"""SkyEyeGPT: frozen vision encoder, alignment layer, LLM decoder with LoRA."""
from ..config import configure_environment

configure_environment()  # quiet, offline-friendly Hugging Face defaults before transformers loads
