"""Test-side access to the NNCodec 2.1.3 reference implementation, which runs in its own interpreter."""
