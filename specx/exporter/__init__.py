"""The torch/transformers side of specx (install with the ``export`` extra): load, adapt, export, validate."""
