"""Placeholder (in progress)."""
def check_tiling(chunk_size, dtype, head_dims):
  pass
