"""Synthetic data: phantom head-CT studies written as real DICOM files (the demo's and the tests' data)."""

from raysys.synthetic.phantom import (
    DENSE_PREVALENCE,
    HEAD_MASK,
    RSNA_PREVALENCE,
    PhantomConfig,
    mask_to_input,
    plan_dataset,
    read_masks,
    write_dataset,
)

__all__ = [
    "DENSE_PREVALENCE",
    "HEAD_MASK",
    "RSNA_PREVALENCE",
    "PhantomConfig",
    "mask_to_input",
    "plan_dataset",
    "read_masks",
    "write_dataset",
]
