"""Self-supervised learning: DINO and batched H&E multi-crop augmentation."""
