"""From a source to training batches (above :mod:`facemargin.data.sources`).

:mod:`~facemargin.data.loading.plan` (the epoch plan, pure function of counters),
:mod:`~facemargin.data.loading.loader` (``PlanSampler`` / ``BatchReader`` / ``TrainLoader``),
:mod:`~facemargin.data.loading.slots` (batches packed into reused shared memory),
:mod:`~facemargin.data.loading.layout` (HWC -> CHW and flips on the device),
:mod:`~facemargin.data.loading.normalize` (uint8 tensors, normalisation on the device),
:mod:`~facemargin.data.loading.augment` (device-side augmentations),
:mod:`~facemargin.data.loading.device_decode` (JPEG decoding on the training device).
Submodules import torch; this package imports nothing.
"""
