"""Quantizers and bit packing. Each quantizer maps a 2-D float tensor to bytes and back."""
