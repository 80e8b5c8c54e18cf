"""Data pipelines: Zarr HU slices -> paired (original, masked) 3-channel images.

Each step has a NumPy reference from the paper's equations (windowing, edges, resize,
masking, composed in reference.py); kernels.py and graph.py run the same transform in DALI
on the CPU or a GPU; source.py and loader.py feed it from the store. The modules, the order
of operations and why: docs/pipelines.md.
"""
