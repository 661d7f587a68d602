"""What every softmax kernel shares: the dense masked softmax and the FlexAttention plumbing."""
