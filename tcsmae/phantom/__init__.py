"""Synthetic chest CT (the embedded default data): DICOM series via `tcsmae phantom`, or a
store written directly (`phantom_store`) for pretraining's default and the benchmark.
"""
