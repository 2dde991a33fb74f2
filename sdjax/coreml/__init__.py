"""Core ML export support: MIL programs built with coremltools' ``Builder`` (no PyTorch),
and ``interp``, a NumPy interpreter that runs them on Linux, where Core ML itself cannot."""
