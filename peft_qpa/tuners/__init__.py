"""PEFT tuners whose adapter tensors come from a shared quantum generator: the shared machinery (``base``,
``config``, ``saving``, ``model_card``) and one package per method."""
