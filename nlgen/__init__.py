"""nlgen: Hugging Face language models in a terminal and in shell pipelines."""

__version__ = "0.1.0"
