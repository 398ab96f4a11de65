"""raysys: intracranial hemorrhage detection on head-CT DICOMs, on Ray."""
__version__ = "0.1.0"
