"""What runs on worker hosts: decode, transform, classify, persist."""
