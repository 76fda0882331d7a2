"""Task-specific losses and metrics: ``segmentation`` (CE, mIoU / boundary IoU), ``depth``
(SigLoss, gradient matching, depth metrics, depth uncertainty scores) and ``uncertainty``
(segmentation uncertainty maps and how well they flag errors)."""
