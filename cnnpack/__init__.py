"""cnnpack: train an image-classification CNN, export it, prove the export, benchmark it, serve it."""

__version__ = "0.1.0"
