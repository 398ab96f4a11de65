"""Synthetic data: phantom head-CT studies written as real DICOM files (the demo's and the tests' data)."""

from raysys.synthetic.phantom import (
    DENSE_PREVALENCE,
    RSNA_PREVALENCE,
    PhantomConfig,
    plan_dataset,
    write_dataset,
)

__all__ = ["DENSE_PREVALENCE", "RSNA_PREVALENCE", "PhantomConfig", "plan_dataset", "write_dataset"]
