"""The model itself, with no Ray: loading, the exact padded forward pass, windows, timelines."""
