"""dgrepair: post-hoc DG-Hard repair of fine-tuned checkpoints."""
__version__ = "0.1.0"
