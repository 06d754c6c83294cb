"""Task suite: datasets, leak-free splits, metrics, reference scores and demonstration programs."""
