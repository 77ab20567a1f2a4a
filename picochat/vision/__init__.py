"""Vision: the ViT trained on the 8x8 digits (`picochat vision`)."""
