"""The artifacts the stages hand on: their file format, the store that lays them out by the
settings that made them, rebuilding a model from them, and listing what exists."""
