"""The converters into the tcsmae store (installed as tcsmae.convert): DICOM, NIfTI, the manifest."""
