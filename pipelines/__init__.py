"""Data pipelines: Zarr HU slices -> paired (original, masked) 3-channel images.

    config.py      PipelineConfig (frozen; windows, HU range, K, rho, masking, size, ...)
    windowing.py   Eq. 5 windows          edges.py    Eq. 6-9 Sobel edge channel
    resize.py      air padding + antialiased resize (torch reference)
    masking.py     Eq. 1-3 tissue mask, patch mask, keyed random draws
    reference.py   the whole transform of one slice from the steps above (the spec)
    kernels.py     fast batched twins: NumPy (CPU path) and CuPy (GPU path)
    graph.py       the DALI processing graph, one definition for CPU and GPU
    source.py      Zarr slice source: shuffle, shards, resume, body-fraction filter
    loader.py      make_loader: PyTorch-facing loader (dict of tensors on the device)
    baseline.py    the plain DataLoader a user would otherwise write (benchmark yardstick)
    throughput.py  preprocessing slices/s: baseline vs DALI CPU vs DALI GPU
    preview.py     `tcsmae preview`: Fig. 3-style grid and NPZ of a batch
"""
