"""Bytes in and out of checkpoints: the safetensors format, opening a checkpoint (local or hub), byte I/O."""
