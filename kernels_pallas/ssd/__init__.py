"""Chunked SSD scan (Mamba2): Pallas forward + backward kernels and the reference recurrence."""

from kernels_pallas.ssd.kernel import BlockSizes, ssd_pallas, ssd_scan
from kernels_pallas.ssd.reference import repeat_groups, ssd_reference, ssd_step

__all__ = ["BlockSizes", "repeat_groups", "ssd_pallas", "ssd_reference", "ssd_scan", "ssd_step"]
