"""Task-specific losses and metrics: ``segmentation`` (CE, mIoU / boundary IoU) and
``uncertainty`` (uncertainty maps and how well they flag errors)."""
