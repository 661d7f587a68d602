"""Softmax over a sparse pattern: the patterns, the dense reference, the CPU engine and Flex."""
