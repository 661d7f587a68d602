"""Mixture of Block Attention: the gate, the dense reference, the CPU engine and Flex."""
