"""TCS-MAE: tissue-contrastive semi-masked autoencoder pretraining for chest CT."""

__version__ = "0.1.0"
