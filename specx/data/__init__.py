"""Data shipped with specx: the built-in prompt set of `specx bench`."""
