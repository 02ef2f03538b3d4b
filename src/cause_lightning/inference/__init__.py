"""From patch features to labels: dense scores (upsampling, cosine logits), the dense CRF, and
sliding-window inference on images of any size."""
